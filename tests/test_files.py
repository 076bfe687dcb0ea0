"""Nothing a user made is lost: folder replacement survives SIGKILL, saves rescue the prompt,
outputs that cannot work are refused before any training."""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from softprompt import files
from softprompt.adapters import load_adapter
from softprompt.errors import UserError
from softprompt.tuning.save import save_trained
from softprompt.tuning.train import TrainConfig, train


def _folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(content)
    (path / "adapter_model.safetensors").write_text(content)
    return path


# The child writes a new folder over ``target`` and is killed by SIGKILL at the step named.
CHILD = textwrap.dedent(
    """
    import errno, os, signal, sys
    from pathlib import Path
    from softprompt import files

    target, step = Path(sys.argv[1]), sys.argv[2]
    staging = files.staging_dir(target)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staging / name).write_text("new")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if step == "after-exchange":
        exchange = files._exchange
        files._exchange = lambda a, b: (exchange(a, b), die())
    else:  # a platform without an atomic exchange: two renames
        def no_exchange(a, b):
            raise OSError(errno.ENOSYS, "no exchange here")

        files._exchange = no_exchange
        replace, calls = os.replace, []

        def replace_then_maybe_die(a, b):
            replace(a, b)
            calls.append(b)
            if step == "between-renames" and len(calls) == 1:
                die()

        os.replace = replace_then_maybe_die
    files.put_in_place(staging, target)
    """
)


def _kill_during_replace(target: Path, step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(target), step], capture_output=True, text=True
    )


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_killed_after_the_exchange_leaves_the_new_folder_and_a_cleanable_leftover(tmp_path):
    target = _folder(tmp_path / "out", "old")
    proc = _kill_during_replace(target, "after-exchange")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (target / "adapter_config.json").read_text() == "new"
    assert len(_hidden(tmp_path)) == 1  # the old folder, hidden under the staging name
    files.check_output(target, overwrite=True)  # the next run
    assert _hidden(tmp_path) == []
    assert (target / "adapter_model.safetensors").read_text() == "new"


def test_killed_between_two_renames_the_next_run_puts_the_old_folder_back(tmp_path):
    target = _folder(tmp_path / "out", "old")
    proc = _kill_during_replace(target, "between-renames")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()  # the moment an exchange-less platform cannot avoid
    files.check_output(target, overwrite=True)
    assert (target / "adapter_config.json").read_text() == "old"
    # Only the new folder's staging copy was left, and it is gone too.
    assert _hidden(tmp_path) == []


def test_two_rename_fallback_completes(tmp_path):
    target = _folder(tmp_path / "out", "old")
    proc = _kill_during_replace(target, "complete")
    assert proc.returncode == 0, proc.stderr
    assert (target / "adapter_config.json").read_text() == "new"
    assert _hidden(tmp_path) == []


def test_leftovers_of_live_processes_are_kept(tmp_path):
    target = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    dead = tmp_path / f".out.probe-{dead_pid}-abc"
    other = tmp_path / f".other.tmp-{dead_pid}-abc"
    for folder in (live, dead, other):
        folder.mkdir()
    files.clean_leftovers(target)
    assert _hidden(tmp_path) == sorted([live.name, other.name])


@pytest.mark.parametrize(
    "output, message",
    [
        (".", "current folder"),
        ("..", "current folder"),
        ("/", "filesystem root"),
        ("a-file", "is a file"),
        ("a-file/sub", "cannot write"),
        ("not-an-adapter", "not an adapter folder"),
    ],
)
def test_outputs_that_cannot_work_are_refused(tmp_path, monkeypatch, output, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "not-an-adapter" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=message):
        files.check_output(output, overwrite=True)
    assert (tmp_path / "a-file").read_text() == "mine"
    assert (tmp_path / "not-an-adapter" / "notes.txt").read_text() == "mine"


def test_cli_refuses_dot_output_before_training(
    tiny_model_dir, texts_file, tmp_path, monkeypatch, cli_main
):
    work = tmp_path / "empty-cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for args in (["--output", "."], ["--output", ".", "--overwrite"], ["--output", ".."]):
        proc = cli_main("train", "--model", str(tiny_model_dir), "--data", str(texts_file), *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "current folder" in proc.stderr
        assert "training" not in proc.stdout
    assert list(work.iterdir()) == []


TEXTS = ["be kind every day", "be brave every day", "hope every day", "small steps"] * 2


@pytest.fixture()
def trained(spm, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    config = TrainConfig(virtual_tokens=3, epochs=1, batch_size=4)
    start = torch.randn(3, spm.hidden_size) * 0.3
    result = train(spm, "tuned", start, TEXTS, TEXTS[:2], config, progress=False)
    return spm, config, result


@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied")]
)
@pytest.mark.parametrize("where", ["staging", "files", "rename"])
def test_a_failed_save_rescues_the_trained_prompt(
    trained, tmp_path, monkeypatch, code, words, where
):
    spm, config, result = trained
    output = tmp_path / "adapters" / "tuned"
    target = {"staging": "staging_dir", "files": "write_adapter_files", "rename": "put_in_place"}
    real = getattr(importlib.import_module("softprompt.tuning.save"), target[where])

    def fail(path, *args, **kwargs):
        # The output's file system fails; the rescue folder's (the cache's) does not.
        if output.parent in Path(path).parents or Path(path) == output.parent:
            raise OSError(code, os.strerror(code))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(f"softprompt.tuning.save.{target[where]}", fail)
    with pytest.raises(UserError, match=words) as caught:
        save_trained(spm, "tuned", output, config, result)
    message = str(caught.value)
    rescued = Path(message.split("saved to ")[1].split(" instead")[0])
    assert rescued.parent == tmp_path / "cache" / "rescued"
    assert f"mv {rescued} {output}" in message
    assert torch.equal(load_adapter(rescued).weights, spm.adapter_weights("tuned"))
    assert not output.exists()
    assert _hidden(output.parent) == []  # no half-written staging folder


def test_a_save_that_cannot_go_anywhere_says_so(trained, tmp_path, monkeypatch):
    spm, config, result = trained

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("softprompt.tuning.save.write_adapter_files", fail)
    with pytest.raises(UserError, match="could not be saved anywhere else"):
        save_trained(spm, "tuned", tmp_path / "out", config, result)


RESCUE_CLI = textwrap.dedent(
    """
    import errno, os, sys
    import softprompt.tuning.save
    from softprompt.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    softprompt.tuning.save.put_in_place = full
    sys.exit(main(sys.argv[1:]))
    """
)


def test_cli_disk_full_after_training_is_one_line_and_rescues(tiny_model_dir, texts_file, tmp_path):
    env = {**os.environ, "SOFTPROMPT_CACHE": str(tmp_path / "cache")}
    output = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", RESCUE_CLI, "train", "--model", str(tiny_model_dir)]
        + ["--data", str(texts_file), "--output", str(output), "--epochs", "1", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "No space left on device" in lines[0]
    rescued = Path(lines[0].split("saved to ")[1].split(" instead")[0])
    loaded = load_adapter(rescued)
    assert loaded.num_virtual_tokens == 8
    log = json.loads((rescued / "loss_log.json").read_text())
    assert len(log["evals"]) == 2


def test_a_saved_adapter_reaches_the_disk_before_it_replaces_the_old_one(
    trained, tmp_path, monkeypatch
):
    """Every file of the new adapter and its folder are fsynced before the swap, and the
    parent folder after it: a power loss leaves the old adapter or the whole new one."""
    spm, config, result = trained
    output = tmp_path / "adapters" / "tuned"
    save_trained(spm, "tuned", output, config, result)  # an old adapter to replace
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", str(src)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(files, "_exchange", lambda a, b: events.append(("swap", str(a))))
    save_trained(spm, "tuned", output, config, result, overwrite=True)
    swaps = [i for i, (kind, _) in enumerate(events) if kind in ("swap", "rename")]
    assert swaps, events
    staging = events[swaps[-1]][1]
    synced_before = {path for kind, path in events[: swaps[-1]] if kind == "fsync"}
    names = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    written = {os.path.join(staging, name) for name in names} | {staging}
    assert written and written <= synced_before, sorted(written - synced_before)
    assert ("fsync", str(output.parent.resolve())) in events[swaps[-1] :]


def test_a_check_that_fails_after_training_keeps_the_trained_rows(
    tiny_model_dir, texts_file, tmp_path, monkeypatch, cli_main
):
    """The base-model checksum differing after training is a bug: it still fails loudly, but
    the trained prompt is rescued first, not lost."""
    from softprompt.prompt import SoftPromptModel

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    sums = iter(range(100))
    monkeypatch.setattr(SoftPromptModel, "base_checksum", lambda self: str(next(sums)))
    output = tmp_path / "out"
    with pytest.raises(AssertionError, match="kept in") as caught:
        cli_main(
            "train", "--model", str(tiny_model_dir), "--data", str(texts_file),
            "--output", str(output), "--epochs", "1", "--json",
        )  # fmt: skip
    rescued = Path(str(caught.value).split("kept in ")[1])
    assert rescued.parent == tmp_path / "cache" / "rescued"
    assert load_adapter(rescued).num_virtual_tokens == 8
    assert not output.exists()
