"""Side-by-side timings on the embedded model: model load, mixed-adapter batching, training.

Run: .venv/bin/python benchmarks/bench_core.py [--requests 16] [--new-tokens 32]
Figures go in the README with the machine they came from. Ratios measured in one run are what
to compare; absolute seconds move with whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()
    from softprompt.adapters import Adapter
    from softprompt.data import load_texts
    from softprompt.engine import SamplingParams
    from softprompt.generation import Request, generate
    from softprompt.models import embedded_model_dir, load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.init import init_prompt
    from softprompt.tuning.train import TrainConfig, train

    embedded_model_dir()  # convert first, so the loads below are from the cached folder
    start = time.perf_counter()
    load_base_model()
    # The first load in a process also pays for transformers' lazy imports of the model code.
    first_load_s = time.perf_counter() - start
    start = time.perf_counter()
    base = load_base_model()
    load_s = time.perf_counter() - start

    spm = SoftPromptModel(base)
    for i, name in enumerate(["a", "b", "c"]):
        spm.add_adapter(Adapter(name, init_prompt(base, 8, "vocab", seed=i)))
    prompts = load_texts("examples:role-prompts:heldout").texts
    requests = [
        Request(prompts[i % len(prompts)][:60], [None, "a", "b", "c"][i % 4])
        for i in range(args.requests)
    ]
    # Fixed-length output so both ways do the same work: no EOS stop within max_new_tokens.
    config = SamplingParams(max_new_tokens=args.new_tokens)
    # Each way is warmed at the batch size it is timed at: generate() keeps one engine per
    # batch size and builds a new one (packing the weights) when the size changes, which a
    # warm-up at another size would leave inside the timed run.
    warm = SamplingParams(max_new_tokens=2)
    generate(spm, requests[:2], warm, batch_size=args.requests)
    start = time.perf_counter()
    batched = generate(spm, requests, config, batch_size=args.requests)
    batched_s = time.perf_counter() - start
    generate(spm, requests[:2], warm, batch_size=1)
    start = time.perf_counter()
    single = generate(spm, requests, config, batch_size=1)
    single_s = time.perf_counter() - start

    texts = load_texts("examples:quotes").texts[:48]
    result = train(
        spm, "t", init_prompt(base, 8), texts, texts[:8], TrainConfig(epochs=1), progress=False
    )
    print(
        json.dumps(
            {
                "torch_threads": torch.get_num_threads(),
                "embedded_first_load_in_process_s": round(first_load_s, 2),
                "embedded_load_s": round(load_s, 2),
                "requests": args.requests,
                "new_tokens": args.new_tokens,
                "mixed_batch_s": round(batched_s, 2),
                "one_by_one_s": round(single_s, 2),
                "speedup": round(single_s / batched_s, 2),
                "same_greedy_output": batched == single,
                "train_samples_per_s_quotes": round(result.samples / result.seconds, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
