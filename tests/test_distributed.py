"""Data parallel over torch.distributed (gloo, two CPU processes under torchrun): the prompt a
one-process run with the same global batch trains, only rank 0 writing, and a process that dies
ends the run at once with a clear line and a checkpoint that ``--resume`` continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from softprompt.adapters import load_adapter
from softprompt.tuning.checkpoint import STATE_FILE, checkpoint_dir


def wait_for_checkpoint(proc: subprocess.Popen, state: Path, step: int) -> None:
    """Wait (up to 300 s) until the run's checkpoint is at ``step`` or later, or it ends."""
    deadline = time.monotonic() + 300
    seen = 0
    while seen < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if state.is_file():
            try:
                seen = torch.load(state, weights_only=True)["step"]
            except Exception:  # noqa: BLE001 - replaced while being read
                continue


def test_two_processes_train_what_one_does_and_survive_losing_one(
    tiny_model_dir, tmp_path, word_data
):
    train_file, held_file = word_data(320, 4, ["be kind every day", "hope and courage"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTPROMPT_DIST_TIMEOUT": "60"}
    common = [
        "train", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(train_file),
        "--eval-data", str(held_file), "--epochs", "2", "--checkpoint-every", "5", "--json",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", "-m", "softprompt"]
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "softprompt", *common, "--batch-size", "4", "--output", str(one)],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
    )

    two = tmp_path / "two"
    run_two = [*torchrun, *common, "--batch-size", "2", "--output", str(two)]
    proc = subprocess.Popen(run_two, env=env, stderr=subprocess.PIPE, text=True)
    state = checkpoint_dir(two) / STATE_FILE
    wait_for_checkpoint(proc, state, 60)
    assert proc.poll() is None, "the run ended before a process could be killed"
    rank1 = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if p.environ().get("RANK") == "1" and p.environ().get("LOCAL_RANK") == "1"
    ]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - killed_at < 60  # no hang
    ours = [line for line in err.splitlines() if line.startswith("softprompt:")]
    # Rank 0 learns of it from gloo (connection reset) or from torchrun's SIGTERM, whichever
    # comes first; either way one line, naming the checkpoint.
    assert len(ours) == 1 and "another process of this data-parallel run stopped" in ours[0]
    assert "run the same command with --resume" in ours[0]
    assert not two.exists() and state.is_file()  # nothing half-written; the checkpoint stays

    done = subprocess.run(
        [*run_two, "--resume"], env=env, timeout=600, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only rank 0 prints
    assert json.loads(summaries[0])["resumed_from"] >= 60
    # The same global batch (2 processes x 2 rows = 1 process x 4 rows): the same prompt, up to
    # the order of float sums.
    mine, theirs = load_adapter(two).weights, load_adapter(one).weights
    assert torch.allclose(mine, theirs, atol=1e-4), float((mine - theirs).abs().max())
    log_one = json.loads((one / "loss_log.json").read_text())
    log_two = json.loads((two / "loss_log.json").read_text())
    assert json.loads((two / "training_config.json").read_text())["processes"] == 2
    assert [e["step"] for e in log_two["evals"]] == [e["step"] for e in log_one["evals"]]
    for a, b in zip(log_one["evals"], log_two["evals"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    assert not checkpoint_dir(two).exists()


def test_accelerate_launch_trains_what_one_process_does(tiny_model_dir, tmp_path, word_data):
    # accelerate's --multi_gpu launcher is torchrun's; with no GPU the processes use gloo.
    # (accelerate's --cpu flag starts one process, not several.)
    accelerate = Path(sys.executable).with_name("accelerate")
    train_file, held_file = word_data(64, 4, ["be kind every day", "hope and courage"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    common = [
        "train", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(train_file),
        "--eval-data", str(held_file), "--epochs", "2", "--json",
    ]  # fmt: skip
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", "0", "-m", "softprompt"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = subprocess.run(
        [*launch, *common, "--batch-size", "2", "--output", str(two)],
        env=env, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # --json keeps stdout to the one JSON summary; what the run is doing goes to stderr
    assert "data parallel over 2 processes" in done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    subprocess.run(
        [sys.executable, "-m", "softprompt", *common, "--batch-size", "4", "--output", str(one)],
        env=env, timeout=300, check=True, capture_output=True,
    )  # fmt: skip
    mine, theirs = load_adapter(two).weights, load_adapter(one).weights
    assert torch.allclose(mine, theirs, atol=1e-4), float((mine - theirs).abs().max())
    assert json.loads((two / "training_config.json").read_text())["processes"] == 2


def _layer_bytes(model_dir: Path) -> tuple[int, int]:
    """Bytes of the tiny model's decoder stack (layers and final norm) and of its embedding."""
    from softprompt.models import load_base_model

    model = load_base_model(str(model_dir)).model
    embedding = model.get_input_embeddings().weight
    stack = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    stack += sum(p.numel() * p.element_size() for p in model.model.norm.parameters())
    return stack, embedding.numel() * embedding.element_size()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_sharded_run_trains_what_one_process_does_with_half_the_layers_each(
    tiny_model_dir, tmp_path, word_data, method
):
    # 29 texts in global batches of 4: the last batch has one row, so one process's share is
    # empty and it must still run the sharded layers with the other.
    train_file, held_file = word_data(29, 5, ["be kind every day", "hope and courage"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTPROMPT_DIST_TIMEOUT": "120"}
    common = [
        "train", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(train_file),
        "--eval-data", str(held_file), "--epochs", "2", "--method", method, "--lr", "0.1",
    ]  # fmt: skip
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "softprompt", *common, "--batch-size", "4", "--output", str(one)],
        check=True, env=env, timeout=600, capture_output=True,
    )  # fmt: skip
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", "-m", "softprompt", *common, "--shard",
         "--batch-size", "2", "--output", str(two)],
        env=env, timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("sharded: process") == 2  # rank 0 prints every process's share

    from softprompt.tuning.init import init_prefix, init_prompt

    start = (init_prompt if method == "prompt" else init_prefix)(
        load_base_model_for(tiny_model_dir), 8, "vocab", seed=0
    )
    mine, theirs = load_adapter(two).weights, load_adapter(one).weights
    moved = float((theirs - start).norm())
    assert moved > 0.1  # training moved the prompt, so the comparison below means something
    assert float((mine - theirs).norm()) < 0.01 * moved

    record = json.loads((two / "training_config.json").read_text())
    assert record["sharded"] is True and record["processes"] == 2
    stack, embedding = _layer_bytes(tiny_model_dir)
    for held in record["weights_held"]:
        # about half the stack each (a shard is padded to equal sizes), the embedding whole
        assert 0.45 * stack <= held["sharded"] <= 0.6 * stack, (held, stack)
        assert held["whole"] == embedding


def load_base_model_for(model_dir: Path):
    from softprompt.models import load_base_model

    return load_base_model(str(model_dir))


def test_shard_outside_a_launch_or_with_compile_is_refused_in_one_line(
    tiny_model_dir, tmp_path, cli_main, word_data
):
    train_file, _ = word_data(8, 1, ["be kind"])
    base = ["train", "--model", str(tiny_model_dir), "--data", str(train_file), "--shard"]
    alone = cli_main(*base, "--output", str(tmp_path / "a"))
    assert alone.returncode == 2 and "torchrun or accelerate launch" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1
    compiled = cli_main(*base, "--compile", "--output", str(tmp_path / "b"))
    assert compiled.returncode == 2 and "--compile with --shard" in compiled.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_model_whose_layers_cannot_be_found_is_refused():
    from types import SimpleNamespace

    from softprompt.errors import UserError
    from softprompt.tuning.distributed import decoder_layers

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(
                get_text_config=lambda: SimpleNamespace(num_hidden_layers=3)
            )
            self.blocks = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(UserError, match="cannot find the decoder layers of Flat"):
        decoder_layers(Flat())


def test_a_sharded_multi_task_run_stopped_midway_resumes_to_the_end(
    tiny_model_dir, tmp_path, word_data
):
    # Checkpoints hold the prompts, not the base model, so --resume and --task work sharded as
    # they do unsharded: stop a sharded two-task run after a checkpoint, resume it, and both
    # adapters come out, with the steps of a run never stopped.
    train_file, _ = word_data(300, 6, ["be kind every day", "hope and courage"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTPROMPT_DIST_TIMEOUT": "60"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    out = tmp_path / "ads"
    run = [
        *torchrun, "--nproc_per_node", "2", "-m", "softprompt", "train", "--shard",
        "--model", str(tiny_model_dir), "--device", "cpu", "--task", f"a={train_file}",
        "--task", f"b={train_file}", "--epochs", "3", "--batch-size", "2",
        "--checkpoint-every", "5", "--output", str(out), "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True)
    state = checkpoint_dir(out) / STATE_FILE
    wait_for_checkpoint(proc, state, 10)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and state.is_file(), err[-2000:]
    assert not (out / "a").exists()

    done = subprocess.run([*run, "--resume"], env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][0])
    assert [t["resumed_from"] is not None for t in summary["tasks"]] == [True, True]
    for name in ("a", "b"):
        log = json.loads((out / name / "loss_log.json").read_text())
        assert [e["epoch"] for e in log["evals"]] == [0, 1, 2, 3]
        assert load_adapter(out / name).num_virtual_tokens == 8
    assert not checkpoint_dir(out).exists()


def test_when_rank_0_cannot_save_every_process_ends_at_once_saying_why(
    tiny_model_dir, tmp_path, word_data
):
    train_file, held_file = word_data(160, 5, ["be kind every day"])
    # A long wait for a lost peer: a process left waiting for rank 0 would show as a hang.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTPROMPT_DIST_TIMEOUT": "120"}
    out = tmp_path / "out"
    run = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "softprompt", "train", "--model", str(tiny_model_dir), "--device", "cpu",
        "--data", str(train_file), "--eval-data", str(held_file), "--epochs", "2",
        "--batch-size", "2", "--checkpoint-every", "5", "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, checkpoint_dir(out) / STATE_FILE, 5)
    assert proc.poll() is None, "the run ended before its output could be taken"
    # Something of the user's appears where the adapter goes: rank 0's save is refused.
    out.write_text("mine\n")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert out.read_text() == "mine\n"  # never replaced
    ours = [line for line in err.splitlines() if line.startswith("softprompt:")]
    assert len(ours) == 2, err[-3000:]
    mine = [line for line in ours if "rank 0" not in line]
    others = [line for line in ours if "rank 0" in line]
    assert len(mine) == 1 and "saved to" in mine[0]  # rank 0: why, and where its rows went
    assert len(others) == 1 and "could not save" in others[0] and str(out) in others[0]
    # torchrun prints a traceback of its own for a failed process; none comes from softprompt
    assert "src/softprompt/" not in err and "site-packages/softprompt/" not in err
