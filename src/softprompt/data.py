"""Datasets of texts: Hub ids, local files and folders, and the bundled examples; batching.

Every source ends up as a list of strings. Batches are left padded: ``[pad ...][virtual][text]``
with attention mask 0 on the pads and position ids counted from the first real token, so a row
gives the same result alone or in any batch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .hub import unreachable_note

EXAMPLE_PREFIX = "examples:"
# name -> (file stem, text field)
EXAMPLES = {"role-prompts": ("role_prompts", "prompt"), "quotes": ("quotes", "quote")}
LOCAL_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


@dataclass
class Texts:
    """Texts read from one source, with the field they came from."""

    source: str
    texts: list[str]
    field: str


def example_names() -> list[str]:
    """Names accepted after ``examples:``, each with a ``:heldout`` variant."""
    return sorted(EXAMPLES)


def heldout_source(source: str) -> str | None:
    """The held-out part of a bundled example set, or None for any other source."""
    if source.startswith(EXAMPLE_PREFIX) and source.count(":") == 1:
        return source + ":heldout"
    return None


def load_texts(source: str, text_field: str | None = None, max_samples: int | None = None) -> Texts:
    """Read the texts of ``source``.

    ``source`` is ``examples:NAME`` (or ``examples:NAME:heldout``), a local ``.jsonl``,
    ``.json``, ``.csv``, ``.parquet`` or ``.txt`` file, a local dataset folder, or a Hub dataset
    id (its ``train`` split). Without ``text_field``, the field ``text`` or the only string field
    is used.

    Raises:
        UserError: missing file, unreachable dataset, unknown field, or no texts at all.
    """
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be at least 1, not {max_samples}")
    if source.startswith(EXAMPLE_PREFIX):
        rows, default_field = _example_rows(source)
        columns = {default_field: [r[default_field] for r in rows]}
        text_field = text_field or default_field
    else:
        columns = _dataset_columns(source)
    field = _pick_field(source, columns, text_field)
    texts = [t for t in columns[field] if isinstance(t, str) and t.strip()]
    if max_samples is not None:
        texts = texts[:max_samples]
    if not texts:
        raise UserError(f"{source} has no non-empty texts in field {field!r}")
    return Texts(source=source, texts=texts, field=field)


def split_heldout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and hold out ``fraction`` (at least one text) for evaluation."""
    if len(texts) < 2:
        raise UserError("need at least 2 texts to hold some out; pass --eval-data")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = min(len(texts) - 1, max(1, round(len(texts) * fraction)))
    held = set(order[:n_held])
    return (
        [t for i, t in enumerate(texts) if i not in held],
        [t for i, t in enumerate(texts) if i in held],
    )


def _example_rows(source: str) -> tuple[list[dict[str, Any]], str]:
    parts = source[len(EXAMPLE_PREFIX) :].split(":")
    name, part = parts[0], (parts[1] if len(parts) > 1 else "train")
    if name not in EXAMPLES or part not in ("train", "heldout") or len(parts) > 2:
        choices = ", ".join(f"examples:{n}[:heldout]" for n in example_names())
        raise UserError(f"unknown example set {source!r}; choose from {choices}")
    stem, text_field = EXAMPLES[name]
    path = resources.files("softprompt") / "examples" / f"{stem}.{part}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows, text_field


def _dataset_columns(source: str) -> dict[str, list[Any]]:
    """Columns of the dataset at ``source`` through ``datasets.load_dataset``."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if path.is_file():
            builder = LOCAL_FORMATS.get(path.suffix.lower())
            if builder is None:
                known = ", ".join(LOCAL_FORMATS)
                raise UserError(f"{source}: unsupported file type; use one of {known}")
            loaded = datasets.load_dataset(builder, data_files=str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        elif path.suffix.lower() in LOCAL_FORMATS or source.startswith((".", "/", "~")):
            raise UserError(f"data file {source} does not exist")
        else:
            loaded = datasets.load_dataset(source)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreachable or malformed data
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load dataset {source!r}: {message}{unreachable_note()}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return {name: loaded[name] for name in loaded.column_names}


def _pick_field(source: str, columns: dict[str, list[Any]], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(
                f"{source} has no field {wanted!r}; its fields are: {', '.join(columns) or 'none'}"
            )
        return wanted
    if "text" in columns:
        return "text"
    strings = [n for n, col in columns.items() if col and isinstance(col[0], str)]
    if len(strings) == 1:
        return strings[0]
    raise UserError(
        f"{source}: choose a text field with --text-field; its fields are: {', '.join(columns)}"
    )


def pad_left(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token id rows into ``input_ids``, ``attention_mask`` and ``position_ids`` (B, L)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
