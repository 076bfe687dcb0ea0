"""The HTTP server under load against the engine offline, on the same requests.

The embedded model, 8 adapters of 20 virtual tokens in a folder plus the base model, greedy,
end-of-sequence ignored so both ways do the same work. First the engine runs every request at
once in this process (offline, no HTTP); then ``softprompt serve`` starts in its own process and
32 concurrent streaming clients (httpx, see ``clients``) send the same requests over
127.0.0.1. Reported: throughput of each and their ratio, time to first token p50/p95 as the
clients saw it, and whether every answer equals the offline one (nothing lost or mixed up).

Run: .venv/bin/python benchmarks/bench_server.py [--requests 128] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
clients_cpu: list[float] = []
sys.path.insert(0, str(HERE))


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def offline(folder: Path, requests, new_tokens: int, batch: int) -> tuple[dict, list[str]]:
    from softprompt.engine import Engine, EngineConfig, SamplingParams
    from softprompt.models import load_base_model

    base = load_base_model()
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=batch))
    for adapter in sorted(p.name for p in folder.iterdir()):
        engine.add_adapter(adapter, folder / adapter)
    engine.generate([requests[0][0]], [None], SamplingParams(max_new_tokens=2))  # warm-up
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    done = engine.generate([p for p, _ in requests], [a for _, a in requests], params)
    seconds = time.perf_counter() - start
    record = emit(
        {
            "way": "engine_offline_all_at_once",
            "requests": len(requests),
            "seconds": round(seconds, 2),
            "tok_s": round(len(requests) * new_tokens / seconds, 1),
            "engine_prefill_s": round(engine.stats.prefill_seconds, 2),
            "engine_decode_s": round(engine.stats.decode_seconds, 2),
        }
    )
    return record, [c.text for c in done]


def start_server(folder: Path, batch: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "softprompt.cli", "serve", "--adapters", str(folder)]
    command += ["--port", "0", "--max-batch-size", str(batch)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("the server did not start")
        if "playground at" in line:
            return proc, line.split("playground at ")[1].strip().rstrip("/")


async def clients(url: str, model_name: str, requests, new_tokens: int, concurrency: int):
    """``concurrency`` clients streaming completions; a light load generator (httpx, one
    ``json.loads`` per event) so that on a 2-core machine the clients take little of the CPU
    the server is measured on. The official ``openai`` client is what the tests use."""
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    texts: list[str | None] = [None] * len(requests)
    ttft: list[float] = []
    limits = httpx.Limits(max_connections=concurrency)
    client = httpx.AsyncClient(base_url=url, timeout=600, limits=limits)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            prompt, adapter = requests[i]
            body = {
                "model": adapter or model_name,
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            sent = time.perf_counter()
            pieces, first = [], None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    text = json.loads(line[6:])["choices"][0]["text"]
                    if text and first is None:
                        first = time.perf_counter() - sent
                    pieces.append(text)
            texts[i] = "".join(pieces)
            if first is not None:
                ttft.append(first)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    clients_cpu.append(time.process_time() - cpu)
    await client.aclose()
    return texts, ttft, seconds


def _metrics(url: str) -> dict[str, float]:
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="the engine's max batch")
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from bench_engine import workload

    from softprompt.adapters import Adapter, adapter_config, write_adapter_files
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.init import init_prompt

    base = load_base_model()
    spm = SoftPromptModel(base)
    folder = Path(tempfile.mkdtemp(prefix="bench-server-"))
    names = [f"p{i}" for i in range(8)]
    for i, name in enumerate(names):
        rows = init_prompt(base, 20, "vocab", seed=i)
        (folder / name).mkdir()
        write_adapter_files(folder / name, rows, adapter_config(Adapter(name, rows), base.name))
    requests = workload(spm, args.requests, names)
    model_name = base.name
    del spm, base
    emit(
        {
            "machine": f"{os.cpu_count()} cpus",
            "requests": args.requests,
            "clients": args.clients,
            "adapters": len(names),
            "new_tokens": args.new_tokens,
            "batch_size": args.batch_size,
        }
    )
    off, expected = offline(folder, requests, args.new_tokens, args.batch_size)
    proc, url = start_server(folder, args.batch_size)
    try:
        asyncio.run(clients(url, model_name, requests[:4], 2, 4))  # warm-up
        texts, ttft, seconds = asyncio.run(
            clients(url, model_name, requests, args.new_tokens, args.clients)
        )
        metrics = _metrics(url)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    quantiles = statistics.quantiles(ttft, n=20)
    served = emit(
        {
            "way": "server_32_clients_streaming",
            "requests": len(requests),
            "seconds": round(seconds, 2),
            "tok_s": round(len(requests) * args.new_tokens / seconds, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(quantiles[18], 3),
            "answered": sum(t is not None for t in texts),
            "equal_to_offline": sum(t == e for t, e in zip(texts, expected, strict=True)),
            "engine_mean_batch": round(
                metrics["softprompt_generation_tokens_total"]
                / metrics["softprompt_engine_steps_total"],
                1,
            ),
            "clients_cpu_s": round(clients_cpu[-1], 2),
            "engine_prefill_s": round(metrics["softprompt_prefill_seconds_total"], 2),
            "engine_decode_s": round(metrics["softprompt_decode_seconds_total"], 2),
        }
    )
    emit({"summary": {"server_over_offline": round(served["tok_s"] / off["tok_s"], 2)}})


if __name__ == "__main__":
    main()
