"""What log-probabilities cost in the engine, and that rows not asking for them pay nothing.

One engine on the embedded model runs the same 64 requests (4 adapters of 20 virtual tokens and
the base model mixed, 64 new tokens, greedy, no early stop) three ways, alternating round by
round so the machine's drift falls on all of them alike:

  - none:  no request asks for log-probabilities;
  - one:   one request of the 64 asks for ``logprobs=5`` (the other 63 are the rows measured);
  - all:   every request asks for ``logprobs=5``.

"none" against "one" is the price the 63 rows pay for a neighbour's log-probabilities; "none"
against "all" is the price of computing them for every row. The end-to-end figures move with
the machine by more than these prices, so the script also times the one function that differs
between the ways, ``pick_tokens`` (choosing each row's next token, and the log-probabilities
when asked), on logits of the real shape (64 rows x the vocabulary), against the engine's mean
decode step.

Run: .venv/bin/python benchmarks/bench_logprobs.py [--rounds 3] [--requests 64] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from softprompt.adapters import Adapter
    from softprompt.engine import Engine, EngineConfig, SamplingParams
    from softprompt.engine.autotune import cpu_signature
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.init import init_prompt

    base = load_base_model()
    spm = SoftPromptModel(base)
    names = [f"a{i}" for i in range(4)]
    for i, name in enumerate(names):
        spm.add_adapter(Adapter(name, init_prompt(base, 20, "vocab", seed=i)))
    requests = workload(spm, args.requests, names)
    prompts, adapters = [p for p, _ in requests], [a for _, a in requests]
    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_batch_size=args.requests))
    for name in names:
        engine.add_adapter(name, spm.adapters[name])

    def params(logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, logprobs=logprobs)

    ways = {
        "none": [params(None)] * len(prompts),
        "one": [params(5)] + [params(None)] * (len(prompts) - 1),
        "all": [params(5)] * len(prompts),
    }
    engine.generate(prompts, adapters, params(None))  # warm-up: packing, kernels, the path pick
    print(json.dumps({"cpu": cpu_signature(), "machine": platform.machine()}), flush=True)
    seen: dict[str, list[float]] = {w: [] for w in ways}
    reference = None
    for round_ in range(args.rounds):
        for way, per_request in ways.items():
            start = time.perf_counter()
            done = engine.generate(prompts, adapters, per_request)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for c in done)
            ids = [c.token_ids for c in done]
            reference = reference or ids
            assert ids == reference, f"{way}: the tokens changed with log-probabilities asked"
            seen[way].append(tokens / seconds)
            print(json.dumps({"round": round_, "way": way, "tok_s": round(tokens / seconds, 1)}))
    step_ms = 1000 * engine.stats.decode_seconds / max(1, engine.stats.steps)
    picks = time_pick_tokens(len(prompts), spm.vocab_size, ways)
    print()
    print(f"torch threads {torch.get_num_threads()}; tok/s per round, median, ratio to none")
    print("| way | tok/s per round | median | vs none |")
    print("|---|---|---:|---:|")
    base_median = statistics.median(seen["none"])
    for way, values in seen.items():
        median = statistics.median(values)
        per = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {way} | {per} | {median:.1f} | {median / base_median:.3f} |")
    print()
    print(f"pick_tokens on ({len(prompts)}, {spm.vocab_size}) logits, median of 200 calls each,")
    print(f"against the engine's mean decode step of {step_ms:.1f} ms (all runs above):")
    print("| way | ms per step | share of a decode step |")
    print("|---|---:|---:|")
    for way, ms in picks.items():
        print(f"| {way} | {ms:.3f} | {ms / step_ms:.2%} |")


def time_pick_tokens(rows: int, vocab: int, ways: dict[str, list]) -> dict[str, float]:
    """Median milliseconds of ``pick_tokens`` per way, calls alternating way by way."""
    from softprompt.engine.sampling import pick_tokens

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(200):
        for way, per_row in ways.items():
            scratch = logits.clone()
            out: dict = {}
            start = time.perf_counter()
            pick_tokens(scratch, per_row, lambda: seen, [0] * rows, [0], [None] * rows, out)
            times[way].append(1000 * (time.perf_counter() - start))
            assert len(out) == sum(p.logprobs is not None for p in per_row)
    return {way: statistics.median(values) for way, values in times.items()}


if __name__ == "__main__":
    main()
