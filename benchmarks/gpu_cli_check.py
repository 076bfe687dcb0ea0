"""The CLI and the server on one CUDA GPU: what ``gpu_check.py`` leaves out.

On a random-init model of the embedded model's config saved to a folder (no weights can be
downloaded there), with a word-level tokenizer (``gpu_check.tokenizer_for``):

  1. float32 on the GPU: the engine's greedy completions of mixed requests (4 prompt adapters,
     a prefix adapter and the base model) all at once vs each alone: how many are identical
     (float32 should make it all);
  2. ``softprompt serve --device cuda --dtype float32`` in its own process, answering the official
     ``openai`` client: 24 requests from concurrent threads (one streamed), each compared with the
     engine's answer in step 1; then SIGTERM, and the exit status;
  3. ``softprompt train --device cuda --task ... --task ...``: two prompts in one run on the GPU,
     each saved, then loaded and evaluated on the CPU.

Prints one JSON line per check ("ok": true or false, with what was seen). Run from the
repository root: ``python benchmarks/gpu_cli_check.py --out DIR`` (``--device cpu --tiny`` is
the smoke run the test suite does, so the script is known to work before GPU time is spent).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import (  # noqa: E402
    CONFIGS,
    TINY,
    adapter_rows,
    build_model,
    tokenizer_for,
    workload,
)


def emit(check: str, ok: bool, **seen: Any) -> bool:
    print(json.dumps({"check": check, "ok": ok, **seen}), flush=True)
    return ok


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "softprompt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model (smoke run)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    spec = TINY if args.tiny else CONFIGS["135M"]
    ok = True

    from softprompt.adapters import Adapter, adapter_config, write_adapter_files
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    model_dir, adapters_dir = out / "model", out / "adapters"
    model = build_model(spec, torch.device("cpu"), torch.float32)
    tokenizer = tokenizer_for(spec["vocab_size"])
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = adapter_rows(model, 4, 8)
    for name, weights in rows.items():
        (adapters_dir / name).mkdir(parents=True, exist_ok=True)
        write_adapter_files(
            adapters_dir / name, weights, adapter_config(Adapter(name, weights), str(model_dir))
        )
    # One deep prompt (prefix tuning) among them, started from the model's own keys/values.
    from types import SimpleNamespace

    from softprompt.prefix import PrefixShape, peft_config
    from softprompt.tuning.init import init_prefix

    deep = init_prefix(SimpleNamespace(model=model, tokenizer=tokenizer), 6, "vocab", seed=5)
    deep_config = peft_config(6, PrefixShape.of(model), str(model_dir))
    (adapters_dir / "deep").mkdir(parents=True, exist_ok=True)
    write_adapter_files(adapters_dir / "deep", deep, deep_config)
    prompts, targets = workload(spec["vocab_size"], args.requests, len(rows))
    targets = ["deep" if i % 6 == 5 else t for i, t in enumerate(targets)]
    texts = [" ".join(f"t{i}" for i in p) for p in prompts]

    # 1. float32 on the device: batched vs alone.
    model = model.to(device)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=len(prompts)))
    for name, weights in rows.items():
        engine.add_adapter(name, Adapter(name, weights))
    engine.add_adapter("deep", Adapter("deep", deep, deep_config))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    batched = engine.generate(texts, targets, params)
    alone = [engine.generate([t], [a], params)[0] for t, a in zip(texts, targets, strict=True)]
    same = sum(b.token_ids == a.token_ids for b, a in zip(batched, alone, strict=True))
    ok &= emit(
        "float32_batched_vs_alone",
        same == len(texts),
        identical=same,
        of=len(texts),
        device=str(device),
        graphs=bool(engine.config.graphs),
    )
    expected = [c.text for c in batched]
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. The server on the device, answering the openai client.
    import openai

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "softprompt",
            "serve",
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters_dir),
            "--device",
            args.device,
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--max-batch-size",
            "32",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120
    )
    started = time.monotonic()
    models: list[str] = []
    while time.monotonic() - started < 180 and server.poll() is None:
        try:
            models = [m.id for m in client.models.list().data]
            break
        except openai.APIConnectionError:
            time.sleep(0.5)
    ok &= emit("serve_started", bool(models), models=models, seconds=time.monotonic() - started)
    base = next((m for m in models if m not in rows and m != "deep"), "")
    if models:

        def ask(i: int) -> str:
            model_name = targets[i] or base
            if i == 0:
                stream = client.completions.create(
                    model=model_name, prompt=texts[i], max_tokens=args.new_tokens,
                    temperature=0, stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                return "".join(chunk.choices[0].text for chunk in stream)
            reply = client.completions.create(
                model=model_name, prompt=texts[i], max_tokens=args.new_tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return reply.choices[0].text

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(texts)) as pool:
            answers = list(pool.map(ask, range(len(texts))))
        seconds = time.perf_counter() - start
        equal = sum(a == e for a, e in zip(answers, expected, strict=True))
        ok &= emit(
            "serve_answers_equal_engine",
            equal == len(texts),
            equal=equal,
            of=len(texts),
            seconds=round(seconds, 2),
            first=answers[0][:60],
        )
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        code = None
    log = server.stdout.read() if server.stdout else ""
    (out / "serve.log").write_text(log)
    ok &= emit("serve_stopped_on_sigterm", code == 0, exit_status=code, log_tail=log[-300:])

    # 3. Two prompts in one training run on the device; loaded and evaluated on the CPU.
    tasks = out / "tasks"
    proc = cli(
        "train", "--model", str(model_dir), "--device", args.device, "--task",
        "quotes=examples:quotes", "--task", "roles=examples:role-prompts", "--epochs", "1",
        "--output", str(tasks), "--json", timeout=600,
    )  # fmt: skip
    summary = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else {}
    ok &= emit(
        "train_tasks_on_device",
        proc.returncode == 0,
        summary=summary,
        stderr=proc.stderr[-300:] if proc.returncode else "",
    )
    if proc.returncode == 0:
        checked = []
        for item in summary["tasks"]:
            folder = Path(item["adapter"])
            held = json.loads((folder / "training_config.json").read_text())["eval_data"]
            if held == "heldout.jsonl":
                held = str(folder / held)
            ev = cli(
                "eval", "--model", str(model_dir), "--device", "cpu", "--adapter", str(folder),
                "--data", held, "--json",
            )  # fmt: skip
            losses = (
                [r["loss"] for r in json.loads(ev.stdout) if r["adapter"]]
                if ev.returncode == 0
                else []
            )
            checked.append(
                {
                    "adapter": folder.name,
                    "cpu_float32_loss": losses[0] if losses else None,
                    "device_loss": item["heldout_loss_after"],
                    "stderr": ev.stderr[-200:] if ev.returncode else "",
                }
            )
        # Training on a GPU runs bf16 by default: the CPU's float32 loss is close, not equal.
        close = all(
            c["cpu_float32_loss"] is not None
            and abs(c["cpu_float32_loss"] - c["device_loss"]) <= 0.02 * abs(c["device_loss"])
            for c in checked
        )
        ok &= emit("task_adapters_load_on_cpu", close, checked=checked)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
