"""How long one heavy request holds every other client of ``softprompt serve``.

Starts ``softprompt serve`` on the embedded model with two adapters (its own process, as users
run it), polls ``/health`` every 20 ms from a thread, and sends each of the heavy bodies once,
alone: chats of 250 to 8,000 two-character messages, ``{"prompt": ["a"] * 20000, "n": 8}``,
150,000 one-letter prompts. For each it reports the answer's status and time, and the longest
``/health`` took while it was in flight (what every other client waited).

Run: .venv/bin/python benchmarks/bench_stalls.py [--max-messages N] [--server-flag=...]
(against another checkout: ``--python OTHER/.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch


def chat(count: int) -> dict:
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": "hi"} for i in range(count - 1)]
    return {"messages": [*messages, {"role": "user", "content": "hi"}], "max_tokens": 4}


BODIES = {
    "chat 128 messages (the limit)": ("/v1/chat/completions", chat(128)),
    "chat 250 messages": ("/v1/chat/completions", chat(250)),
    "chat 1,000 messages": ("/v1/chat/completions", chat(1000)),
    "chat 2,000 messages (75 KB)": ("/v1/chat/completions", chat(2000)),
    "chat 8,000 messages (300 KB)": ("/v1/chat/completions", chat(8000)),
    'prompt ["a"] x 20,000, n 8': ("/v1/completions", {"prompt": ["a"] * 20000, "n": 8}),
    'prompt ["a"] x 150,000': ("/v1/completions", {"prompt": ["a"] * 150000}),
}


def write_adapters(folder: Path) -> None:
    from softprompt.adapters import Adapter, adapter_config, write_adapter_files
    from softprompt.models import load_base_model

    base = load_base_model()
    hidden = base.model.config.hidden_size
    for seed, name in enumerate(("roles", "quotes")):
        rows = torch.randn(8, hidden, generator=torch.Generator().manual_seed(seed)) * 0.1
        (folder / name).mkdir(parents=True)
        write_adapter_files(folder / name, rows, adapter_config(Adapter(name, rows), base.name))


def start(python: str, folder: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [python, "-m", "softprompt.cli", "serve", "--adapters", str(folder), "--port", "0"] + flags,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while not lines or "playground at" not in lines[-1]:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("the server did not start:\n" + "".join(lines))
        lines.append(line)
    # Its log goes on to stderr: read it, or a full pipe would stall the server.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, lines[-1].split("playground at ")[1].strip().rstrip("/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the server's interpreter")
    parser.add_argument("--server-flag", action="append", default=[], help="passed to serve")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        write_adapters(folder)
        proc, url = start(args.python, folder, args.server_flag)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        worst = [0.0]
        stop = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=url, timeout=args.timeout) as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    client.get("/health")
                    worst[0] = max(worst[0], time.perf_counter() - started)
                    time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            print(f"{'body':32} {'status':>6} {'answer s':>9} {'/health worst s':>16}")
            for name, (path, body) in BODIES.items():
                content = json.dumps({"model": model, **body}, separators=(",", ":")).encode()
                time.sleep(0.3)
                worst[0] = 0.0
                started = time.perf_counter()
                r = httpx.post(
                    url + path,
                    content=content,
                    headers={"Content-Type": "application/json"},
                    timeout=args.timeout,
                )
                took = time.perf_counter() - started
                time.sleep(0.1)  # the poll in flight when the answer came
                print(f"{name:32} {r.status_code:>6} {took:>9.2f} {worst[0]:>16.2f}")
                if r.status_code != 200:
                    print(f"    {r.json()['error']['message'][:110]}")
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
