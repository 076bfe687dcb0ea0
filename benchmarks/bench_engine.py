"""The serving engine against the ways a user would serve soft prompts otherwise, side by side.

The same requests (default 64, spread over 8 adapters of 20 virtual tokens and the base model,
64 new tokens each, end-of-sequence ignored so every way does the same work, greedy, float32) run:

  (a) PEFT as the guide does it: ``set_adapter``, then ``generate`` per request;
  (b) PEFT grouped by adapter: one batched ``generate`` per adapter;
  (c) this engine, every request submitted at once;
  (d) the base model alone, no adapters: one static batched transformers ``generate`` (ceiling);
  (e) this engine under arriving load (Poisson arrivals), continuous vs static batching:
      throughput, time to first token and time per output token;
  (f) vLLM's CPU build on the same mixed requests as ``prompt_embeds`` (adapter rows, then the
      prompt's token embeddings) and base-model token ids, when its venv exists (see --vllm-python).
      (c) and (f) are timed alike (one warmed-up engine each, --rounds runs of every request) and
      alternate, run by run, so that both meet the same machine.

Then prefix reuse (prefill of requests whose adapter has 100 virtual tokens, with the prefix
cached vs computed with the text) and memory (resident adapters: 1 and 100).

Run: .venv/bin/python benchmarks/bench_engine.py [--requests 64] [--new-tokens 64]
Prints one JSON object per measurement, then a summary. Absolute figures move with whatever else
the machine is doing; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEER = HERE / "vllm_peer.py"


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def workload(spm, count: int, adapters: list[str]) -> list[tuple[str, str | None]]:
    """``count`` (prompt, adapter) pairs: bundled texts, cut short, adapters and base in turn."""
    from softprompt.data import load_texts

    texts = load_texts("examples:role-prompts").texts + load_texts("examples:quotes").texts
    rng = random.Random(0)
    rng.shuffle(texts)
    targets: list[str | None] = [*adapters, None]
    return [
        (" ".join(texts[i % len(texts)].split()[:12]), targets[i % len(targets)])
        for i in range(count)
    ]


def peft_model(spm, folders: dict[str, Path]):
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(spm.model, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.eval()
    return model


def hf_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )


def run_peft(spm, folders, requests, new_tokens: int, one_by_one: int) -> tuple[dict, dict]:
    model = peft_model(spm, folders)
    tok = spm.tokenizer
    hf_generate(model, tok, [requests[0][0]], 2)  # warm-up
    subset = requests[:one_by_one]
    start = time.perf_counter()
    for prompt, adapter in subset:
        if adapter is None:
            hf_generate(spm.model, tok, [prompt], new_tokens)
        else:
            model.set_adapter(adapter)
            hf_generate(model, tok, [prompt], new_tokens)
    single = time.perf_counter() - start
    groups: dict[str | None, list[str]] = {}
    for prompt, adapter in requests:
        groups.setdefault(adapter, []).append(prompt)
    start = time.perf_counter()
    for adapter, prompts in groups.items():
        if adapter is None:
            hf_generate(spm.model, tok, prompts, new_tokens)
        else:
            model.set_adapter(adapter)
            hf_generate(model, tok, prompts, new_tokens)
    grouped = time.perf_counter() - start
    model.unload() if hasattr(model, "unload") else None
    a = emit(
        {
            "way": "a_peft_set_adapter_per_request",
            "requests": len(subset),
            "seconds": round(single, 2),
            "tok_s": round(len(subset) * new_tokens / single, 1),
        }
    )
    b = emit(
        {
            "way": "b_peft_grouped_by_adapter",
            "requests": len(requests),
            "seconds": round(grouped, 2),
            "tok_s": round(len(requests) * new_tokens / grouped, 1),
        }
    )
    return a, b


def run_base_static(spm, requests, new_tokens: int) -> dict:
    tok = spm.tokenizer
    hf_generate(spm.model, tok, [requests[0][0]], 2)
    start = time.perf_counter()
    hf_generate(spm.model, tok, [p for p, _ in requests], new_tokens)
    seconds = time.perf_counter() - start
    return emit(
        {
            "way": "d_base_model_static_generate",
            "requests": len(requests),
            "seconds": round(seconds, 2),
            "tok_s": round(len(requests) * new_tokens / seconds, 1),
        }
    )


def run_arrivals(spm, requests, new_tokens: int, batch: int, rate: float, policy: str) -> dict:
    """Submit requests at Poisson arrival times from one thread; the engine runs on its own."""
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_batch_size=batch, policy=policy))
    for name, adapter in spm.adapters.items():
        engine.add_adapter(name, adapter)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate([requests[0][0]], [requests[0][1]], SamplingParams(max_new_tokens=2))
    rng = random.Random(1)
    gaps = [rng.expovariate(rate) for _ in requests]
    finished: dict[int, float] = {}
    handles = []
    engine.start()
    start = time.perf_counter()
    try:
        due = start
        for (prompt, adapter), gap in zip(requests, gaps, strict=True):
            due += gap
            time.sleep(max(0.0, due - time.perf_counter()))
            handles.append(engine.submit(prompt, adapter, params))
        results = []
        for i, handle in enumerate(handles):
            results.append(handle.result())
            finished[i] = time.perf_counter()
    finally:
        engine.stop()
    end = max(h.seq.first_token_at or 0 for h in handles)
    end = max(end, max(finished.values()))
    ttft = sorted(c.time_to_first_token or 0.0 for c in results)
    # Time per output token after the first, per request: its decode pace as a user sees it.
    tpot = []
    for handle in handles:
        seq = handle.seq
        if (
            seq.first_token_at is not None
            and seq.finished_at is not None
            and len(seq.output_ids) > 1
        ):
            tpot.append((seq.finished_at - seq.first_token_at) / (len(seq.output_ids) - 1))
    tpot.sort()
    return emit(
        {
            "way": f"e_engine_arrivals_{policy}",
            "requests": len(requests),
            "arrival_rate_per_s": round(rate, 2),
            "seconds": round(end - start, 2),
            "tok_s": round(len(requests) * new_tokens / (end - start), 1),
            "ttft_p50_s": round(statistics.median(ttft), 2),
            "ttft_p95_s": round(ttft[int(0.95 * (len(ttft) - 1))], 2),
            "tpot_p50_ms": round(1000 * statistics.median(tpot), 1),
            "tpot_p95_ms": round(1000 * tpot[int(0.95 * (len(tpot) - 1))], 1),
        }
    )


class VllmPeer:
    """vLLM's peer process (``vllm_peer.py``), warmed up; ``run()`` times one run of every
    request there. Its stderr goes to ``log``."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        ready = self._next("ready")
        self.version = ready.get("vllm") if ready else None
        self.alive = ready is not None

    def _next(self, key: str) -> dict | None:
        """The peer's next JSON line holding ``key`` (None if it ended first)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                record = json.loads(line)
                if key in record:
                    return record
        return None

    def run(self) -> float | None:
        """Seconds for one run of every request (None, and no longer alive, if it ended)."""
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        record = self._next("seconds")
        self.alive = record is not None
        return None if record is None else record["seconds"]

    def cpu_seconds(self) -> float | None:
        """CPU time the peer has used so far, user and system, all its threads (Linux)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pause(self, paused: bool) -> None:
        """Stop the peer's every thread (SIGSTOP) while the engine runs, or let it go on, so
        that nothing it leaves spinning after a run (OpenMP workers waiting for more work)
        takes a core from the engine."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def close(self) -> None:
        self.pause(False)
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # end of input: the peer returns
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` on this machine, the faster
    of torch's ``@`` and oneDNN's inner product on a packed weight (on some CPUs MKL's sgemm
    behind ``@`` is far below oneDNN, and the engine uses oneDNN): best of ``repeats``,
    torch's threads. The physical limit each figure is set against."""
    from softprompt.engine.packed import PackedLinear

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    linear = PackedLinear(b, dtype=dtype)
    best = float("inf")
    for way in (lambda: a @ b, lambda: linear.narrow(a)):
        way()
        best = min(best, *(_timed(way) for _ in range(repeats)))
    return 2 * size**3 / best / 1e9


def decode_share_of_peak(engine, batch: int) -> dict:
    """The engine's full decode step (``batch`` rows, 48 cached columns) against the matrix
    product peak of the dtype its linear layers multiply in: linear-layer GFLOP/s over peak."""
    runner = engine.runner
    picked = runner.decode_path.picked
    dtype = torch.bfloat16 if picked.bfloat16 else torch.float32
    linear = sum(m.weight.numel() for m in runner.base.modules() if isinstance(m, torch.nn.Linear))
    steps = [runner._time_decode(batch) for _ in range(3)]
    ms = min(steps)
    achieved = 2 * linear * batch / (ms / 1000) / 1e9
    peak = max(matmul_peak(dtype), matmul_peak(dtype))  # it moves on a shared machine
    return {
        "decode_step": {
            "rows": batch,
            "linear_dtype": str(dtype).removeprefix("torch."),
            "kv_cache_dtype": str(runner.cache_dtype).removeprefix("torch."),
            "ms": round(ms, 2),
            "linear_gflops": round(achieved),
            "matmul_peak_gflops": round(peak),
            "share_of_peak": round(achieved / peak, 2),
        }
    }


def best_over_best(results: dict) -> float | None:
    """The engine's best tok/s at any dtype over vLLM's best at any dtype (None unless both
    sides ran at float32 and bfloat16)."""
    ways = [results.get(w) for w in ("c", "c_bfloat16", "f", "f_bfloat16")]
    if not all(w and "tok_s" in w for w in ways):
        return None
    tok_s = [w["tok_s"] for w in ways]
    return round(max(tok_s[:2]) / max(tok_s[2:]), 2)


def start_vllm(
    spm, requests, new_tokens: int, python: str, model_dir: Path, tmp: Path, dtype: str
) -> VllmPeer | None:
    """vLLM's peer, warmed up; None (and a record saying why) when its venv is missing or it
    fails to start."""
    if not Path(python).exists():
        emit(
            {
                "way": "f_vllm_cpu",
                "skipped": f"no vLLM venv at {python} (README.md: Benchmarks, serving engine)",
            }
        )
        return None
    tok = spm.tokenizer
    spec = tmp / "requests.pt"
    torch.save(
        {
            "model": str(model_dir),
            "new_tokens": new_tokens,
            "dtype": dtype,
            "requests": [
                {
                    "ids": tok(p)["input_ids"],
                    "rows": None if a is None else spm.adapters[a].weights.detach().clone(),
                }
                for p, a in requests
            ],
        },
        spec,
    )
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_LOGGING_LEVEL="WARNING",
        VLLM_NO_USAGE_STATS="1",  # no background thread gathering usage data during the runs
    )
    peer = VllmPeer([python, str(PEER), str(spec)], env, tmp / "vllm.log")
    if not peer.alive:
        peer.close()
        tail = (tmp / "vllm.log").read_text().strip().splitlines()[-1:]
        emit({"way": "f_vllm_cpu", "failed": tail})
        return None
    return peer


def run_side_by_side(
    spm,
    requests,
    new_tokens: int,
    batch: int,
    rounds: int,
    peer: VllmPeer | None,
    torch_decode: bool = False,
    pause_peer: bool = True,
) -> tuple[dict, dict | None, dict | None]:
    """(c) and (f), alternating: each round runs every request once through the engine and once
    through vLLM, in turn (c then f, then f then c, ...), so both meet the same machine (its
    speed drifts by up to 1.5x over minutes). Timed the same way on both sides: one engine (one
    LLM) warmed up on the first two requests, then ``rounds`` runs. The engine's first run pays
    what a new server pays once (most adapters' prefixes, MKL's full-batch packing, the cache
    growing to the full batch).

    ``torch_decode``: a third participant in every round, the same engine with its decode steps
    on PyTorch's kernels instead of the fused C ones (``cpu_kernels.py``): what they gain.

    ``pause_peer``: vLLM's process is stopped (SIGSTOP) while the engine runs, so it cannot
    take a core; either way the CPU time each side used while the other ran is reported."""
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def engine_run(cpu_kernels: bool | None):
        config = EngineConfig(max_batch_size=batch, cpu_kernels=cpu_kernels)
        engine = Engine(spm.model, spm.tokenizer, config)
        if engine.runner.decode_path is not None:
            emit({"way": "c" if cpu_kernels is None else "c_torch",
                  "decode_path": engine.runner.decode_path.summary()})  # fmt: skip
            if cpu_kernels is None:
                emit(decode_share_of_peak(engine, batch))
        for name, adapter in spm.adapters.items():
            engine.add_adapter(name, adapter)
        warm = requests[:2]
        engine.generate(
            [p for p, _ in warm], [a for _, a in warm], SamplingParams(max_new_tokens=2)
        )

        def run() -> float | None:
            start = time.perf_counter()
            engine.generate([p for p, _ in requests], [a for _, a in requests], params)
            return time.perf_counter() - start

        return run

    def vllm_run() -> float | None:
        if peer is None or not peer.alive:
            return None
        seconds = peer.run()
        if seconds is None:
            emit({"way": "f_vllm_cpu", "failed": "the vLLM peer ended early"})
        return seconds

    ways = {"c": engine_run(None), "f": vllm_run}
    if torch_decode:
        ways["c_torch"] = engine_run(False)
    runs: dict[str, list[float]] = {way: [] for way in ways}
    # CPU seconds the side that should be idle used during the other side's runs: the peer
    # during the engine's (0 when paused), this process during vLLM's.
    stray: dict[str, list[float]] = {"peer_during_engine": [], "engine_during_vllm": []}
    names = list(ways)
    for index in range(rounds):
        # Each round in another order: c f [t], then f [t] c, ...
        shift = index % len(names)
        for way in names[shift:] + names[:shift]:
            if way == "f":
                before = time.process_time()
                seconds = ways[way]()
                stray["engine_during_vllm"].append(round(time.process_time() - before, 2))
            else:
                if peer is not None and pause_peer:
                    peer.pause(True)
                before = peer.cpu_seconds() if peer is not None else None
                seconds = ways[way]()
                after = peer.cpu_seconds() if peer is not None else None
                if peer is not None and pause_peer:
                    peer.pause(False)
                if before is not None and after is not None:
                    stray["peer_during_engine"].append(round(after - before, 2))
            if seconds is not None:
                runs[way].append(seconds)
    if peer is not None:
        emit({"idle_side_cpu_seconds": stray, "peer_paused_during_engine": pause_peer})
    tokens = len(requests) * new_tokens

    def record(way: str, runs: list[float], **extra) -> dict:
        return emit(
            {
                "way": way,
                "requests": len(requests),
                "seconds": round(min(runs), 2),
                "tok_s": round(tokens / min(runs), 1),
                "runs_tok_s": [round(tokens / r, 1) for r in runs],
                "best_of": len(runs),
                **extra,
            }
        )

    def per_round(theirs: list[float]) -> dict:
        ratios = [round(t / o, 2) for o, t in zip(runs["c"], theirs, strict=True)]
        return {"per_round": ratios, "median": statistics.median(ratios)}

    c = record("c_engine_all_at_once", runs["c"])
    torch_record = None
    if torch_decode and len(runs["c_torch"]) == len(runs["c"]):
        ratios = per_round(runs["c_torch"])
        torch_record = record(
            "c_engine_torch_decode",
            runs["c_torch"],
            fused_over_torch_per_round=ratios["per_round"],
            fused_over_torch_median=ratios["median"],
        )
    if not runs["f"] or len(runs["f"]) != len(runs["c"]):
        return c, None, torch_record
    ratios = per_round(runs["f"])
    f = record(
        "f_vllm_cpu_prompt_embeds",
        runs["f"],
        vllm=peer.version if peer is not None else None,
        c_over_f_per_round=ratios["per_round"],
        c_over_f_median=ratios["median"],
    )
    return c, f, torch_record


def run_prefix_reuse(spm, count: int = 32, virtual: int = 100) -> dict:
    """Prefill of ``count`` requests whose adapter has ``virtual`` tokens: text only after the
    cached prefix, against prefilling the adapter's rows with the text (no reuse)."""
    from softprompt.engine.runner import ModelRunner
    from softprompt.tuning.init import init_prompt

    runner = ModelRunner(spm.model)
    rows = init_prompt(spm.base, virtual, "vocab", seed=7)
    from softprompt.adapters import Adapter

    prefix = runner.prefix(Adapter("long", rows))
    texts = [spm.text_ids(p) for p, _ in workload(spm, count, ["x"])]
    longest = max(len(t) for t in texts)

    def with_reuse() -> None:
        runner.prefill(texts, [prefix] * count)

    def without_reuse() -> None:
        cache = runner.new_cache(count, virtual + longest)
        embeds = torch.zeros(count, virtual + longest, spm.hidden_size)
        valid = torch.zeros(count, virtual + longest, dtype=torch.bool)
        positions = torch.zeros(count, virtual + longest, dtype=torch.long)
        with torch.no_grad():
            for j, text in enumerate(texts):
                pad = longest - len(text)
                row = torch.cat([rows, runner.embedding(torch.tensor(text))])
                embeds[j, pad:] = row
                valid[j, pad:] = True
                positions[j, pad:] = torch.arange(virtual + len(text))
            runner.forward(cache, slice(0, count), embeds, positions, valid)

    timings = {}
    for name, fn in (("with_reuse", with_reuse), ("without_reuse", without_reuse)):
        fn()
        best = min(_timed(fn) for _ in range(3))
        timings[name] = best
    return emit(
        {
            "way": "prefix_reuse_prefill",
            "requests": count,
            "virtual_tokens": virtual,
            "text_tokens_mean": round(sum(map(len, texts)) / count, 1),
            "with_reuse_s": round(timings["with_reuse"], 3),
            "without_reuse_s": round(timings["without_reuse"], 3),
            "speedup": round(timings["without_reuse"] / timings["with_reuse"], 2),
        }
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_memory(spm) -> dict:
    """Resident size with 1 and with 100 adapters of 20 virtual tokens loaded and used."""
    from softprompt.adapters import Adapter
    from softprompt.engine import Engine, EngineConfig, SamplingParams
    from softprompt.tuning.init import init_prompt

    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_resident_adapters=128))
    sizes = {}
    rss = {}
    for count in (1, 100):
        for i in range(len(engine.adapters()), count):
            engine.add_adapter(
                f"m{i}", Adapter(f"m{i}", init_prompt(spm.base, 20, "vocab", seed=i))
            )
        engine.generate(["Hello"] * count, engine.adapters(), SamplingParams(max_new_tokens=1))
        sizes[count] = engine.memory()
        rss[count] = _rss_mib()
    return emit(
        {
            "way": "memory",
            "model_mib": round(sizes[1]["model"] / 2**20, 1),
            "packed_copy_mib": round(sizes[1]["packed"] / 2**20, 1),
            "adapters_1_mib": round(sizes[1]["adapters"] / 2**20, 3),
            "adapters_100_mib": round(sizes[100]["adapters"] / 2**20, 2),
            "per_adapter_kib": round(sizes[100]["adapters"] / 100 / 1024, 1),
            "process_rss_1_mib": round(rss[1]),
            "process_rss_100_mib": round(rss[100]),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="the engine's max batch")
    parser.add_argument(
        "--peft-one-by-one",
        type=int,
        default=16,
        help="requests timed for (a), which is slow; tok/s is per request anyway",
    )
    parser.add_argument(
        "--arrival-load",
        type=float,
        default=0.9,
        help="(e) arrival rate as a fraction of (c)'s requests per second",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="(c) and (f) runs, alternating (best is reported)"
    )
    parser.add_argument(
        "--torch-decode",
        action="store_true",
        help="also run (c) with decode steps on PyTorch's kernels, in every round beside (c)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "both", "all"],
        default="float32",
        help="weights of the engine and of vLLM, the same on both sides (bfloat16: the engine "
        "chooses its linear layers' dtype by measurement, as --dtype auto serves); both or "
        "all: (c) and (f) side by side at each dtype (the other parts at float32), with each "
        "dtype's measured matrix-product peak",
    )
    parser.add_argument(
        "--no-pause-peer",
        action="store_true",
        help="leave vLLM's process running while the engine runs (default: stopped, SIGSTOP)",
    )
    parser.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    parser.add_argument(
        "--skip", action="append", default=[], choices=list("abcdef") + ["prefix", "memory"]
    )
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from softprompt.adapters import Adapter, adapter_config, write_adapter_files
    from softprompt.engine.autotune import cpu_signature
    from softprompt.models import embedded_model_dir, load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.init import init_prompt

    model_dir = embedded_model_dir()
    base = load_base_model()
    spm = SoftPromptModel(base)
    names = [f"p{i}" for i in range(args.adapters)]
    folders = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    for i, name in enumerate(names):
        rows = init_prompt(base, args.virtual_tokens, "vocab", seed=i)
        spm.add_adapter(Adapter(name, rows))
        folders[name] = tmp / name
        folders[name].mkdir()
        write_adapter_files(folders[name], rows, adapter_config(Adapter(name, rows), base.name))
    requests = workload(spm, args.requests, names)
    emit(
        {
            "machine": f"{os.cpu_count()} cpus",
            "cpu": cpu_signature(),
            "torch_threads": torch.get_num_threads(),
            "requests": args.requests,
            "adapters": args.adapters,
            "virtual_tokens": args.virtual_tokens,
            "new_tokens": args.new_tokens,
            "dtype": str(base.model.dtype),
        }
    )
    results: dict[str, dict | None] = {}
    if "a" not in args.skip or "b" not in args.skip:
        results["a"], results["b"] = run_peft(
            spm, folders, requests, args.new_tokens, args.peft_one_by_one
        )
    dtypes = ["float32", "bfloat16"] if args.dtype in ("both", "all") else [args.dtype]
    emit({"matmul_peak_gflops": {d: round(matmul_peak(getattr(torch, d))) for d in dtypes}})
    for dtype in dtypes:
        side = spm
        if dtype != "float32":
            side = SoftPromptModel(load_base_model(dtype=getattr(torch, dtype)))
            for name in names:
                side.add_adapter(spm.adapters[name])
        emit({"side_by_side_dtype": dtype})
        with tempfile.TemporaryDirectory() as tmp:
            peer = None
            if "f" not in args.skip:
                peer = start_vllm(
                    side, requests, args.new_tokens, args.vllm_python, model_dir, Path(tmp), dtype
                )
            try:
                c, f, c_torch = run_side_by_side(
                    side,
                    requests,
                    args.new_tokens,
                    args.batch_size,
                    args.rounds,
                    peer,
                    args.torch_decode,
                    pause_peer=not args.no_pause_peer,
                )
            finally:
                if peer is not None:
                    peer.close()
        suffix = "" if dtype == "float32" else f"_{dtype}"
        results["c" + suffix], results["f" + suffix], results["c_torch" + suffix] = c, f, c_torch
    if "d" not in args.skip:
        results["d"] = run_base_static(spm, requests, args.new_tokens)
    if "e" not in args.skip and results.get("c") is None:
        emit({"way": "e", "skipped": "the arrival rate is set from (c) at float32, not run"})
    elif "e" not in args.skip:
        capacity = args.requests / results["c"]["seconds"]
        for policy in ("continuous", "static"):
            results[f"e_{policy}"] = run_arrivals(
                spm,
                requests,
                args.new_tokens,
                args.batch_size,
                args.arrival_load * capacity,
                policy,
            )
    if "prefix" not in args.skip:
        results["prefix"] = run_prefix_reuse(spm)
    if "memory" not in args.skip:
        results["memory"] = run_memory(spm)

    def ratio(x: str, y: str) -> float | None:
        if results.get(x) and results.get(y) and "tok_s" in results[x] and "tok_s" in results[y]:
            return round(results[x]["tok_s"] / results[y]["tok_s"], 2)
        return None

    emit(
        {
            "summary": {
                "c_over_a": ratio("c", "a"),
                "c_over_b": ratio("c", "b"),
                "c_over_d": ratio("c", "d"),
                "c_over_f": ratio("c", "f"),
                "c_over_f_bfloat16": ratio("c_bfloat16", "f_bfloat16"),
                "c_over_f_median_of_rounds": (results.get("f") or {}).get("c_over_f_median"),
                "c_over_f_bfloat16_median_of_rounds": (results.get("f_bfloat16") or {}).get(
                    "c_over_f_median"
                ),
                "fused_over_torch_decode_median_of_rounds": (results.get("c_torch") or {}).get(
                    "fused_over_torch_median"
                ),
                "continuous_over_static_under_arrivals": ratio("e_continuous", "e_static"),
                "best_dtype_over_best_dtype": best_over_best(results),
            }
        }
    )


if __name__ == "__main__":
    sys.exit(main())
