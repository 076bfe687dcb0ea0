"""Training checkpoints: small, written atomically, refused when they belong to another run.

A run training into ``OUTPUT`` keeps its checkpoint in the hidden sibling ``.OUTPUT.checkpoint/``
(the output folder itself is written whole at the end, see ``files``), as one file,
``state.pt``: the prompt rows, AdamW's state, the schedule's step, where in which epoch the run
is, the RNG states, the curves so far and the best rows seen. Each write goes to a temporary file
that is flushed to disk and then renamed over the last one, so a crash at any moment leaves the
last good checkpoint whole. The run's fingerprint (its settings, a hash of its texts, the base
model) is stored with it; ``--resume`` with other settings, data or model is refused. A finished
run removes its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import Example, as_example
from ..errors import UserError

STATE_FILE = "state.pt"
FORMAT = 1
ADDED = {"weight_decay": 0.0, "group_by_length": True, "reparam": "none"}
"""Settings added after the first checkpoints were written, with the value those runs had."""
FLAGS = {"dtype": "--dtype", "device": "--device", "model": "--model"}
"""The flag that sets each fingerprint entry, named when a resume is refused."""


def checkpoint_dir(output: str | Path) -> Path:
    """Where the checkpoint of a run writing ``output`` lives."""
    path = Path(output).expanduser().resolve()
    return path.parent / f".{path.name}.checkpoint"


def texts_digest(*groups: Sequence[str | Example]) -> str:
    """SHA-256 over lists of examples (their order and boundaries included); a plain text's
    digest is that of its string, as before other formats existed."""
    digest = hashlib.sha256()
    for texts in groups:
        digest.update(f"{len(texts)}\n".encode())
        for item in texts:
            example = as_example(item)
            text = (
                example.completion
                if example.format == "text"
                else json.dumps(example.as_json(), sort_keys=True)
            )
            data = text.encode()
            digest.update(f"{len(data)}:".encode() + data)
    return digest.hexdigest()


def save(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as the checkpoint in ``folder``, atomically (never a half-written one)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


def load(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint in ``folder``, checked against this run's ``fingerprint``.

    Raises:
        UserError: no checkpoint, a damaged one, or one made by a run with other settings, data
            or model (the message names every difference).
    """
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(
            f"nothing to resume: no checkpoint at {path} (a run writes one every "
            "--checkpoint-every steps and at each epoch's end)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"the checkpoint {path} is damaged ({first}); start over with --overwrite"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a softprompt checkpoint this version can read")
    theirs = state.get("fingerprint", {})
    why: list[str] = []
    for key, value in fingerprint.items():
        old = theirs.get(key)
        if key == "config" and isinstance(old, dict):
            old = {**ADDED, **old}
        if old == value:
            continue
        if key == "config" and isinstance(old, dict):
            why.extend(_config_differences(old, value))
        elif key == "data":
            why.append("it was made on other texts (training or held-out) than this run's")
        elif key in FLAGS:
            why.append(f"its {FLAGS[key]} is {old!r}, this run's is {value!r}")
        else:
            why.append(f"its {key.replace('_', ' ')} is {old!r}, this run's is {value!r}")
    if why:  # every difference at once: one retry fixes them all
        raise UserError(
            f"the checkpoint at {folder} belongs to another run: {'; '.join(why)}; resume with "
            "the same settings, or start over with --overwrite"
        )
    return state


def record(folder: Path) -> dict[str, Any] | None:
    """What the run that wrote the checkpoint in ``folder`` decided before training (its
    search), or None: no checkpoint, an unreadable one, or a run that decided nothing."""
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load() says what is wrong with it
        return None
    found = state.get("record") if isinstance(state, dict) else None
    return found if isinstance(found, dict) else None


def _config_differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Every setting on which two runs' configs differ, as a user reads them."""
    found = []
    for field in [*ours, *(f for f in theirs if f not in ours)]:
        if field not in ours:
            found.append(
                f"it was written by another softprompt version (its setting {field!r} is "
                "unknown to this one)"
            )
        elif field not in theirs:
            found.append(
                f"it was written by another softprompt version (it has no setting {field!r})"
            )
        elif theirs[field] != ours[field]:
            flag = "--" + field.replace("_", "-")
            found.append(f"its {flag} is {theirs[field]!r}, this run's is {ours[field]!r}")
    return found or ["its settings differ from this run's"]


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
