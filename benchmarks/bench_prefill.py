"""Prefill grouped by length: what ``EngineConfig.prefill_padding`` saves, measured side by side.

When many requests join at once, the engine prefills their texts (after each adapter's cached
prefix) in one forward, padded to the longest; ``prefill_padding`` splits them into groups of
similar length instead, a new group whenever padding would pass that share of a group's
positions. Fewer wasted positions, more (smaller) forwards: which wins is a property of the
machine, so this script measures it.

The workload is bench_engine.py's (default 64 requests over 8 adapters of 20 virtual tokens and
the base model, bundled texts cut to 12 words). One warmed-up engine per setting, every request
with one new token (so the run is its prefill), ``--rounds`` runs each, the settings taking turns
in a rotating order; the figure per setting is the engine's own prefill time
(``EngineStats.prefill_seconds``), median over rounds, with the number of forwards and the padding
share of the positions computed.

Run: .venv/bin/python benchmarks/bench_prefill.py [--paddings 1.0 0.3 0.2 0.1 0] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import emit, workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--paddings", type=float, nargs="+", default=[1.0, 0.3, 0.2, 0.1, 0.0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from softprompt.adapters import Adapter
    from softprompt.engine import Engine, EngineConfig, SamplingParams
    from softprompt.engine.autotune import cpu_signature
    from softprompt.engine.scheduler import length_groups
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.init import init_prompt

    base = load_base_model()
    spm = SoftPromptModel(base)
    names = [f"p{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        spm.add_adapter(Adapter(name, init_prompt(base, args.virtual_tokens, "vocab", seed=i)))
    requests = workload(spm, args.requests, names)
    prompts, adapters = [p for p, _ in requests], [a for _, a in requests]
    lengths = [len(spm.text_ids(p)) for p in prompts]
    emit(
        {
            "cpu": cpu_signature(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "requests": args.requests,
            "text_tokens": sum(lengths),
        }
    )
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engines = {}
    for padding in args.paddings:
        engine = Engine(
            spm.model, spm.tokenizer, EngineConfig(max_batch_size=64, prefill_padding=padding)
        )
        for name in names:
            engine.add_adapter(name, spm.adapters[name])
        engine.generate(prompts, adapters, one)  # warm-up: prefixes, shapes
        groups = length_groups(lengths, lambda n: n, padding)
        positions = sum(len(g) * g[0] for g in groups)
        engines[padding] = (engine, len(groups), 1 - sum(lengths) / positions)
    seconds: dict[float, list[float]] = {p: [] for p in args.paddings}
    for index in range(args.rounds):
        shift = index % len(args.paddings)
        for padding in args.paddings[shift:] + args.paddings[:shift]:
            engine = engines[padding][0]
            before = engine.stats.prefill_seconds
            engine.generate(prompts, adapters, one)
            seconds[padding].append(engine.stats.prefill_seconds - before)
    reference = statistics.median(seconds[args.paddings[0]])
    for padding in args.paddings:
        _, forwards, share = engines[padding]
        median = statistics.median(seconds[padding])
        emit(
            {
                "prefill_padding": padding,
                "forwards": forwards,
                "padding_share": round(share, 3),
                "prefill_s_per_round": [round(s, 3) for s in seconds[padding]],
                "prefill_s_median": round(median, 3),
                f"vs_{args.paddings[0]}": round(reference / median, 2),
            }
        )
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
