"""benchmarks/gpu_check.py runs end to end (on the CPU, tiny model), so the script a GPU session
depends on is known to work before device time is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_measurement_on_the_cpu():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--dtype", "float32"]
        + ["--compile-modes"]  # compiling takes a minute on this CPU; the GPU run measures it
        + ["--families", "llama", "gemma2", "phi3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [r for r in records if "error" in r]
    what = {r.get("what", "") for r in records}
    assert {
        "serve: transformers generate, base model, dynamic cache",
        "serve: transformers generate, base model, static cache",
        "serve: softprompt engine, 2 adapters + base mixed",
        "serve: PEFT",
        "train: softprompt step",
        "train: PEFT step, float32 weights, autocast",
    } <= what
    families = [r for r in records if r.get("what", "").startswith("family: ")]
    assert [r["what"] for r in families] == [f"family: {f}" for f in ("llama", "gemma2", "phi3")]
    assert all(r["lean"] and r["identical_to_generate"] == "8/8" for r in families)
    engine = next(r for r in records if r.get("what", "").startswith("serve: softprompt"))
    assert engine["identical_alone_vs_batched"] == "9/9"  # float32 on the CPU: exact
    assert engine["tok_s"] > 0 and engine["vs_hf_static"] > 0


def test_gpu_cli_check_passes_on_the_cpu(tmp_path):
    script = SCRIPT.parent / "gpu_cli_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--out", str(tmp_path)]
        + ["--requests", "6", "--new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["check"] for r in records] == [
        "float32_batched_vs_alone",
        "serve_started",
        "serve_answers_equal_engine",
        "serve_stopped_on_sigterm",
        "train_tasks_on_device",
        "task_adapters_load_on_cpu",
    ], done.stderr[-2000:]
    assert all(r["ok"] for r in records), records
    assert done.returncode == 0
