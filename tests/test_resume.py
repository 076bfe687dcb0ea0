"""Schedules, keeping the best prompt, early stopping, and resuming a killed run exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt.adapters import load_adapter
from softprompt.errors import UserError
from softprompt.insight.evaluate import evaluate
from softprompt.tuning.checkpoint import STATE_FILE, checkpoint_dir
from softprompt.tuning.init import init_prompt
from softprompt.tuning.train import TrainConfig, lr_factor, train
from test_train import TEXTS


def test_learning_rate_schedules():
    constant = lr_factor("constant", 4, 20)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    linear = lr_factor("linear", 0, 10)
    assert [round(linear(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    cosine = lr_factor("cosine", 2, 12)
    assert cosine(0) == 0.5 and cosine(2) == 1.0
    assert math.isclose(cosine(7), 0.5) and math.isclose(cosine(12), 0.0, abs_tol=1e-12)


# Held-out texts unlike the training texts: training on these soon makes them worse.
UNLIKE = ["i want you to act as a travel guide", "the mountain river light", "my first request"]


def _run(spm, **overrides):
    config = TrainConfig(
        **{"virtual_tokens": 4, "epochs": 3, "lr": 0.1, "batch_size": 4, **overrides}
    )
    start = init_prompt(spm.base, config.virtual_tokens, config.init, config.init_text)
    return config, train(spm, "tuned", start, TEXTS, UNLIKE, config, progress=False)


def test_the_rows_kept_are_those_of_the_best_evaluation(spm):
    # Held-out loss falls for a while, then rises as the prompt fits the training texts.
    config, result = _run(spm, lr=0.3, eval_every=1, epochs=6)
    losses = [e["loss"] for e in result.evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best < len(losses) - 1, "the run never got worse; the test needs a worse last step"
    assert result.best_step == result.evals[best]["step"]
    assert result.loss_after == losses[best] < losses[-1]
    # What is loaded (and would be saved) scores exactly the best evaluation's loss.
    kept = evaluate(spm, UNLIKE, "tuned", batch_size=16, max_length=result.config.max_length)
    assert kept.loss == pytest.approx(losses[best], abs=1e-6)


def test_keep_last_keeps_the_last_rows_whatever_their_held_out_loss(spm):
    config, result = _run(spm, lr=0.3, eval_every=1, epochs=6, keep="last")
    losses = [e["loss"] for e in result.evals]
    assert min(losses) < losses[-1], "the run never got worse; the test needs a worse last step"
    assert result.best_step == result.evals[-1]["step"] and result.loss_after == losses[-1]
    kept = evaluate(spm, UNLIKE, "tuned", batch_size=16, max_length=result.config.max_length)
    assert kept.loss == pytest.approx(losses[-1], abs=1e-6)
    with pytest.raises(UserError, match="--keep"):
        TrainConfig(keep="first")


def test_patience_stops_when_held_out_loss_stops_falling(spm):
    config, result = _run(spm, lr=3.0, eval_every=1, patience=2, epochs=20)
    assert result.stopped_early
    assert result.evals[-1]["step"] < 20 * 5  # 18 texts in batches of 4: 5 steps an epoch
    after_best = [e for e in result.evals if e["step"] > result.best_step]
    assert len(after_best) == 2 and all(e["loss"] >= result.loss_after for e in after_best)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "softprompt.cli", *args]


def test_a_run_killed_with_sigkill_resumes_to_the_same_prompt(tiny_model_dir, tmp_path, word_data):
    train_file, held_file = word_data(240, 3, TEXTS[:6])
    common = [
        "train", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(train_file),
        "--eval-data", str(held_file), "--epochs", "3", "--batch-size", "2", "--lr", "0.05",
        "--checkpoint-every", "7", "--eval-every", "40", "--schedule", "cosine",
        "--warmup", "10", "--json",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_cli(*common, "--output", str(whole)), check=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    state = checkpoint_dir(killed) / STATE_FILE
    proc = subprocess.Popen(_cli(*common, "--output", str(killed)), env=env)
    step = 0
    deadline = time.monotonic() + 300
    # Kill it mid-epoch 2 (120 steps an epoch), once a checkpoint past step 150 is on disk.
    while step < 150 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if state.is_file():
            try:
                step = torch.load(state, weights_only=True)["step"]
            except Exception:  # noqa: BLE001 - replaced while being read: read it again
                continue
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not killed.exists() and state.is_file()  # nothing half-written; the checkpoint stays
    saved_step = torch.load(state, weights_only=True)["step"]
    assert 150 <= saved_step < 240 and saved_step % 120 != 0  # mid-epoch 2

    done = subprocess.run(
        _cli(*common, "--output", str(killed), "--resume"),
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == saved_step
    assert torch.equal(load_adapter(killed).weights, load_adapter(whole).weights)
    log_whole = json.loads((whole / "loss_log.json").read_text())
    log_killed = json.loads((killed / "loss_log.json").read_text())
    assert log_killed["steps"] == log_whole["steps"]
    assert untimed(log_killed["evals"]) == untimed(log_whole["evals"])
    assert not checkpoint_dir(killed).exists()  # a finished run removes its checkpoint


def _short_run(model: Path, out: Path, word_data) -> tuple[list[str], Path]:
    """A one-epoch training command writing ``out`` (checkpoints every 5 steps), and its
    held-out file."""
    train_file, held_file = word_data(240, 3, TEXTS[:6])
    base = [
        "train", "--model", str(model), "--device", "cpu", "--data", str(train_file),
        "--eval-data", str(held_file), "--epochs", "1", "--batch-size", "8",
        "--checkpoint-every", "5", "--output", str(out), "--json",
    ]  # fmt: skip
    return base, held_file


def test_resume_refuses_what_it_cannot_continue(tiny_model_dir, tmp_path, cli_main, word_data):
    out = tmp_path / "run"
    base, held_file = _short_run(tiny_model_dir, out, word_data)

    def refused(*extra: str) -> str:
        done = cli_main(*base, *extra)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
        return done.stderr

    assert "nothing to resume" in refused("--resume")
    # Leave a checkpoint behind as a killed run would: a finished run, then its last state.
    folder = checkpoint_dir(out)
    assert cli_main(*base).returncode == 0 and not folder.exists()
    from softprompt.tuning import checkpoint

    original = checkpoint.remove
    checkpoint.remove = lambda path: None  # keep it this once
    try:
        other = tmp_path / "other"
        assert cli_main(*base[:-3], "--output", str(other), "--json").returncode == 0
    finally:
        checkpoint.remove = original
    folder = checkpoint_dir(other)
    assert (folder / STATE_FILE).is_file()
    rest = [a for a in base if a != str(out)]
    rest[rest.index("--output") + 1] = str(other)
    shutil_rm(other)
    done = cli_main(*rest)
    assert done.returncode == 2 and "add --resume to continue it" in done.stderr
    done = cli_main(*rest, "--resume", "--lr", "0.01")
    assert done.returncode == 2 and "its --lr is 0.03, this run's is 0.01" in done.stderr
    # Every difference in the one line, so a user fixes them all in one retry.
    done = cli_main(*rest, "--resume", "--lr", "0.01", "--batch-size", "4", "--dtype", "bfloat16")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    for said in ("its --lr is 0.03, this run's is 0.01", "its --batch-size is 8, this run's is 4"):
        assert said in done.stderr, done.stderr
    assert "its --dtype is 'float32', this run's is 'bfloat16'" in done.stderr
    held_file.write_text(json.dumps({"text": "hope and courage"}) + "\n")
    done = cli_main(*rest, "--resume")
    assert done.returncode == 2 and "made on other texts" in done.stderr
    data = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(data[: len(data) // 2])
    done = cli_main(*rest, "--resume")
    assert done.returncode == 2 and "is damaged" in done.stderr
    done = cli_main(*rest, "--resume", "--overwrite")
    assert done.returncode == 2 and "give one" in done.stderr


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_sigterm_stops_training_with_one_line_naming_the_checkpoint(
    tiny_model_dir, tmp_path, word_data
):
    train_file, held_file = word_data(240, 3, TEXTS[:6])
    out = tmp_path / "stopped"
    state = checkpoint_dir(out) / STATE_FILE
    proc = subprocess.Popen(
        _cli(
            "train",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--data",
            str(train_file),
            "--eval-data",
            str(held_file),
            "--epochs",
            "5",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "5",
            "--output",
            str(out),
            "--json",
        ),  # fmt: skip
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert lines == [
        f"softprompt: training stopped by SIGTERM; the last checkpoint is kept in "
        f"{checkpoint_dir(out)}: run the same command with --resume"
    ]
    assert not out.exists() and state.is_file()


def untimed(evals: list[dict]) -> list[dict]:
    """Evaluation records without their clock readings (which no two runs share)."""
    return [{k: v for k, v in e.items() if k != "train_seconds"} for e in evals]


def test_resume_continues_an_interrupted_overwrite_and_refuses_other_arithmetic(
    tiny_model_dir, tmp_path, cli_main, word_data, monkeypatch
):
    """A run started with --overwrite over an existing adapter and stopped before its save can
    be resumed (the checkpoint describes it); another --dtype, or a checkpoint from a version
    with other settings, is refused in one line."""
    from softprompt.tuning import checkpoint, run

    out = tmp_path / "run"
    base, _ = _short_run(tiny_model_dir, out, word_data)
    assert cli_main(*base).returncode == 0
    before = load_adapter(out).weights

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "remove", lambda path: None)
        patch.setattr(run, "save_trained", interrupted)
        stopped = cli_main(*base, "--overwrite", "--lr", "0.2")
    assert stopped.returncode == 130 and (checkpoint_dir(out) / STATE_FILE).is_file()
    assert torch.equal(load_adapter(out).weights, before)  # the old adapter is still there

    def refused(*extra: str) -> str:
        done = cli_main(*base, "--lr", "0.2", *extra)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    assert "its --dtype is 'float32', this run's is 'bfloat16'" in refused(
        "--resume", "--dtype", "bfloat16"
    )
    state_file = checkpoint_dir(out) / STATE_FILE
    saved = state_file.read_bytes()
    state = torch.load(state_file, weights_only=True)
    state["fingerprint"]["config"]["a_setting_from_a_newer_version"] = 1
    torch.save(state, state_file)
    assert "another softprompt version" in refused("--resume")
    # A checkpoint written before --weight-decay, --group-by-length and --reparam existed is
    # the run these flags' defaults give: it resumes.
    state_file.write_bytes(saved)
    state = torch.load(state_file, weights_only=True)
    del state["fingerprint"]["config"]["weight_decay"]
    del state["fingerprint"]["config"]["group_by_length"]
    del state["fingerprint"]["config"]["reparam"]
    torch.save(state, state_file)
    assert "its --weight-decay is 0.0, this run's is 0.01" in refused(
        "--resume", "--weight-decay", "0.01"
    )

    done = cli_main(*base, "--lr", "0.2", "--resume")
    assert done.returncode == 0, done.stderr
    assert not torch.equal(load_adapter(out).weights, before)
    assert json.loads((out / "training_config.json").read_text())["lr"] == 0.2
    assert not checkpoint_dir(out).exists()


def _scripted(monkeypatch, losses):
    """Held-out evaluations that return ``losses`` in turn (the first is the one before
    training), so the test decides when the run improves."""
    import softprompt.tuning.train as train_module

    script = iter(losses)

    def scripted(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        result.loss = next(script)
        return result

    monkeypatch.setattr(train_module, "evaluate", scripted)


def test_a_run_still_improving_at_its_last_epoch_trains_on_until_it_stops(spm, monkeypatch):
    # epochs 1-3 improve, so the run goes on; 4 improves; 5 and 6 do not: two evaluations
    # without a better loss end it at epoch 6, well before its cap of 10
    _scripted(monkeypatch, [9.0, 5.0, 4.0, 3.0, 2.0, 2.5, 2.6, 1.0])
    config, result = _run(spm, epochs=3, max_epochs=10)
    assert result.epochs_trained == 6 and not result.stopped_early
    assert [e["epoch"] for e in result.evals] == [0, 1, 2, 3, 4, 5, 6]
    assert result.loss_after == 2.0 and result.best_step == result.evals[4]["step"]
    assert len(result.steps) == 6 * 5  # 18 texts in batches of 4: 5 steps an epoch


def test_an_extension_stops_at_the_cap_and_not_without_improvement(spm, monkeypatch):
    _scripted(monkeypatch, [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    _, capped = _run(spm, epochs=2, max_epochs=4)
    assert capped.epochs_trained == 4 and capped.loss_after == 5.0
    spm.remove_adapter("tuned")
    # its best two evaluations before the end: no epoch more
    _scripted(monkeypatch, [9.0, 5.0, 6.0, 7.0, 1.0])
    _, done = _run(spm, epochs=3, max_epochs=10)
    assert done.epochs_trained == 3 and done.loss_after == 5.0
    spm.remove_adapter("tuned")
    # no cap above the epochs (the default when --epochs is given): never more
    _scripted(monkeypatch, [9.0, 5.0, 4.0, 3.0, 1.0])
    _, pinned = _run(spm, epochs=3)
    assert pinned.epochs_trained == 3 and pinned.config.max_epochs == 3


def test_the_epochs_cap_defaults_to_twice_the_epochs_the_data_decides():
    task = ["completion"]
    decided = TrainConfig().resolve(task, rows_per_epoch=(108, 8))
    assert (decided.epochs, decided.max_epochs) == (15, 30)
    assert TrainConfig().resolve(task, rows_per_epoch=(1000, 8)).max_epochs == 10
    # asked epochs, or plain text: no more than asked or decided
    assert TrainConfig(epochs=4).resolve(task, rows_per_epoch=(108, 8)).max_epochs == 4
    assert TrainConfig().resolve(["text"], rows_per_epoch=(108, 8)).max_epochs == 5
    assert TrainConfig(epochs=4, max_epochs=9).resolve(task).max_epochs == 9
    # a cap below the epochs the data decides caps them
    capped = TrainConfig(max_epochs=6).resolve(task, rows_per_epoch=(108, 8))
    assert (capped.epochs, capped.max_epochs) == (6, 6)
    with pytest.raises(UserError, match=r"--max-epochs \(2\) must be at least --epochs \(3\)"):
        TrainConfig(epochs=3, max_epochs=2)
    with pytest.raises(UserError, match="--max-epochs must be at least 1"):
        TrainConfig(max_epochs=0)


def test_a_run_stopped_in_its_extension_resumes_to_the_same_prompt(
    tiny_model_dir, tmp_path, monkeypatch
):
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    losses = [9.0, 5.0, 4.0, 3.0, 2.0, 2.5, 2.6]  # six epochs: three more than planned
    config = TrainConfig(
        virtual_tokens=4, epochs=3, max_epochs=10, lr=0.1, batch_size=4, keep="last"
    )  # the last rows kept: those trained after the resume

    def fresh():
        spm = SoftPromptModel(load_base_model(str(tiny_model_dir)))
        return spm, init_prompt(spm.base, 4, "vocab", None)

    spm, start = fresh()
    _scripted(monkeypatch, losses)
    whole = train(spm, "tuned", start, TEXTS, UNLIKE, config, progress=False)
    assert whole.epochs_trained == 6
    whole_rows = spm.adapter_weights("tuned").clone()

    # the same run, stopped by an error in epoch 5's evaluation (its checkpoint: epoch 4's end)
    spm, start = fresh()
    _scripted(monkeypatch, [*losses[:5], None])
    folder = tmp_path / "checkpoints"
    with pytest.raises(TypeError):
        train(spm, "tuned", start, TEXTS, UNLIKE, config, progress=False, checkpoints=folder)
    spm, start = fresh()
    _scripted(monkeypatch, losses[5:])
    resumed = train(
        spm, "tuned", start, TEXTS, UNLIKE, config, progress=False, checkpoints=folder, resume=True
    )
    assert resumed.epochs_trained == 6 and resumed.best_step == whole.best_step
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in whole.evals]
    assert torch.equal(spm.adapter_weights("tuned"), whole_rows)


def test_a_fall_too_small_to_matter_does_not_extend_a_run(spm, monkeypatch):
    # a loss already near zero, still falling by 0.0001 an epoch: the planned epochs only
    _scripted(monkeypatch, [9.0, 0.0005, 0.0004, 0.0003, 0.0002, 0.0001])
    _, result = _run(spm, epochs=3, max_epochs=10)
    assert result.epochs_trained == 3 and result.loss_after == 0.0003
