"""What bfloat16 costs: the engine's float32 path against its bfloat16 path (linear layers in
bfloat16, a bfloat16 KV cache, everything else float32) on the demo's two adapters.

For each adapter the demo trained (and the base model), on its held-out set:

- held-out loss, nats per token, from the engine's own prompt log-probabilities on every
  held-out text, at each dtype, and the difference;
- greedy agreement: each held-out text's first words as the prompt, ``--new-tokens`` greedy
  tokens at each dtype; the share of completions identical token for token, and the mean share
  of tokens before the first difference.

Run: .venv/bin/python benchmarks/check_dtype_price.py [--demo-output DIR]
(without --demo-output it runs ``softprompt demo`` into a temporary folder first, about two
minutes). Prints one JSON object per adapter, then a summary. The bfloat16 path is forced here
whatever the CPU; on a CPU without native bfloat16 it is much slower but computes the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import emit  # noqa: E402


def held_out_loss(engine, texts: list[str], adapter: str | None) -> tuple[float, int]:
    """Mean negative log-probability per predicted token of ``texts`` (and the token count)."""
    from softprompt.engine import SamplingParams

    params = SamplingParams(max_new_tokens=1, prompt_logprobs=True, logprobs=0)
    done = engine.generate(texts, [adapter] * len(texts), params)
    scores = [t.logprob for c in done for t in (c.prompt_logprobs or []) if t is not None]
    return -sum(scores) / len(scores), len(scores)


def greedy(engine, prompts: list[str], adapter: str | None, new_tokens: int) -> list[list[int]]:
    from softprompt.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, [adapter] * len(prompts), params)]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share identical, mean share of tokens before the first difference)."""
    same, prefix = 0, 0.0
    for x, y in zip(a, b, strict=True):
        same += x == y
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        prefix += n / len(x)
    return same / len(a), prefix / len(a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-output", type=Path, help="a folder `softprompt demo` wrote")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=8)
    args = parser.parse_args()

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from softprompt.adapters import load_adapter
    from softprompt.data import load_texts
    from softprompt.engine import Engine, EngineConfig
    from softprompt.engine.autotune import cpu_signature
    from softprompt.models import load_base_model

    folder = args.demo_output
    scratch = None
    if folder is None:
        scratch = tempfile.TemporaryDirectory(prefix="dtype-price-")
        folder = Path(scratch.name) / "demo"
        subprocess.run(
            [sys.executable, "-m", "softprompt.cli", "demo", "--output", str(folder)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    summary = json.loads((folder / "summary.json").read_text())
    base = load_base_model()
    emit({"cpu": cpu_signature(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    engines = {}
    for dtype in ("float32", "bfloat16"):
        config = EngineConfig(max_batch_size=32, cpu_linear_dtype=dtype, prefix_cache_mb=0)
        engine = Engine(base.model, base.tokenizer, config)
        for name in summary["adapters"]:
            engine.add_adapter(name, load_adapter(folder / name, name=name, hub=False))
        engines[dtype] = engine
        emit({"dtype": dtype, "decode_path": engine.runner.decode_path.summary()})
    rows = []
    for name, facts in summary["adapters"].items():
        texts = load_texts(facts["heldout"]).texts
        prompts = [" ".join(t.split()[: args.prompt_words]) for t in texts]
        for adapter in (name, None):
            losses = {d: held_out_loss(e, texts, adapter) for d, e in engines.items()}
            tokens = {d: greedy(e, prompts, adapter, args.new_tokens) for d, e in engines.items()}
            identical, prefix = agreement(tokens["float32"], tokens["bfloat16"])
            f32, bf16 = losses["float32"][0], losses["bfloat16"][0]
            rows.append(
                emit(
                    {
                        "adapter": adapter or "(base model)",
                        "heldout": facts["heldout"],
                        "texts": len(texts),
                        "tokens_scored": losses["float32"][1],
                        "loss_float32": round(f32, 4),
                        "loss_bfloat16": round(bf16, 4),
                        "loss_difference": round(bf16 - f32, 4),
                        "loss_difference_percent": round(100 * (bf16 - f32) / f32, 2),
                        "greedy_identical": round(identical, 3),
                        "greedy_prefix_agreement": round(prefix, 3),
                        "new_tokens": args.new_tokens,
                    }
                )
            )
    for engine in engines.values():
        engine.stop()
    emit(
        {
            "summary": {
                "largest_loss_difference_percent": max(
                    abs(r["loss_difference_percent"]) for r in rows
                ),
                "greedy_identical_mean": round(
                    sum(r["greedy_identical"] for r in rows) / len(rows), 3
                ),
                "greedy_prefix_agreement_mean": round(
                    sum(r["greedy_prefix_agreement"] for r in rows) / len(rows), 3
                ),
            }
        }
    )
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
