"""Datasets: Hub ids, local files and folders, and the bundled examples; batching.

Every source ends up as a list of examples in one of three formats, detected per dataset as TRL
does: ``{"text": ...}`` (every token scored), ``{"prompt": ..., "completion": ...}`` (the loss on
the completion only) and ``{"messages": [{"role", "content"}, ...]}`` (rendered with the model's
chat template, the loss on the assistant turns only). Batches are left padded:
``[pad ...][virtual][text]`` with attention mask 0 on the pads and position ids counted from the
first real token, so a row gives the same result alone or in any batch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import UserError
from .hub import unreachable_note

T = TypeVar("T")
EXAMPLE_PREFIX = "examples:"
# name -> (file stem, text field)
EXAMPLES = {
    "role-prompts": ("role_prompts", "prompt"),
    "quotes": ("quotes", "quote"),
    # prompt/completion: messages routed to opaque team codes (benchmarks/make_task_sets.py)
    "routing": ("routing", "completion"),
    # chat: an assistant that answers in a pirate's voice (benchmarks/make_task_sets.py)
    "pirate": ("pirate", "messages"),
    # the rest of the task suite (benchmarks/suite_sets.py)
    "shelving": ("shelving", "completion"),  # book blurbs to 5 opaque shelf codes
    "booking": ("booking", "completion"),  # a booking reference among other codes: exact match
    "signoff": ("signoff", "messages"),  # answers that must end with a fixed closing line
    "initials": ("initials", "completion"),  # a phrase's initials: exact match
}
LOCAL_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


FORMATS = ("text", "completion", "chat")
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One example: a plain text, a prompt with its completion, or a conversation.

    A plain text is a completion with an empty prompt: every token of it is scored.
    """

    completion: str = ""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] | None = None
    """``(role, content)`` pairs; the assistant turns are what is scored. A task row (see
    ``scoring.task_rows``) keeps the conversation before its last assistant turn here and that
    turn's text in ``completion``: then the completion alone is scored."""
    choices: tuple[str, ...] | None = None
    """This row's own candidate completions for rank classification (``--choices-field``)."""

    @property
    def format(self) -> str:
        if self.messages is not None:
            return "chat"
        return "completion" if self.prompt else "text"

    def as_json(self) -> dict[str, Any]:
        """The example as a dataset row of its format (what held-out files hold)."""
        out: dict[str, Any]
        if self.messages is not None:
            turns = [
                *self.messages,
                *((("assistant", self.completion),) if self.completion else ()),
            ]
            out = {"messages": [{"role": r, "content": c} for r, c in turns]}
        elif self.prompt:
            out = {"prompt": self.prompt, "completion": self.completion}
        else:
            out = {"text": self.completion}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def as_example(item: str | Example) -> Example:
    return item if isinstance(item, Example) else Example(completion=item)


KINDS = {"text": "texts", "completion": "prompt/completion examples", "chat": "conversations"}
"""Each data format's examples, as messages name them."""


@dataclass
class Fields:
    """Which dataset fields hold the parts of prompt/completion and chat examples (None: the
    defaults, ``prompt``, ``completion`` and ``messages``)."""

    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    choices: str | None = None
    """A field with each row's own candidate completions (a list of strings), for
    ``eval --metric choice``; None: no per-row candidates."""


@dataclass
class Texts:
    """Examples read from one source, with their format and the field(s) they came from."""

    source: str
    examples: list[Example]
    field: str
    """The text field (text format), else the fields used, comma-separated."""
    format: str = "text"

    @property
    def texts(self) -> list[str]:
        """The plain texts (text format only)."""
        if self.format != "text":
            raise UserError(f"{self.source} holds {self.format} examples, not plain texts")
        return [e.completion for e in self.examples]


def example_names() -> list[str]:
    """Names accepted after ``examples:``, each with a ``:heldout`` variant."""
    return sorted(EXAMPLES)


def heldout_source(source: str) -> str | None:
    """The held-out part of a bundled example set, or None for any other source."""
    if source.startswith(EXAMPLE_PREFIX) and source.count(":") == 1:
        return source + ":heldout"
    return None


def load_texts(
    source: str,
    text_field: str | None = None,
    max_samples: int | None = None,
    fields: Fields | None = None,
) -> Texts:
    """Read the examples of ``source``, detecting their format.

    ``source`` is ``examples:NAME`` (or ``examples:NAME:heldout``), a local ``.jsonl``,
    ``.json``, ``.csv``, ``.parquet`` or ``.txt`` file, a local dataset folder, or a Hub dataset
    id (its ``train`` split). A dataset with a ``messages`` field (``fields.messages``) is chat;
    one with ``prompt`` and ``completion`` fields is prompt/completion; any other is plain text,
    from ``text_field``, else the field ``text`` or the only string field.

    Raises:
        UserError: missing file, unreachable dataset, unknown field, no examples at all, a
            dataset mixing formats, or a conversation with no assistant turn.
    """
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be at least 1, not {max_samples}")
    fields = fields or Fields()
    if source.startswith(EXAMPLE_PREFIX):
        rows, default_field = _example_rows(source)
        names = {k for r in rows for k in r}
        columns = {k: [r.get(k) for r in rows] for k in names}
        text_field = text_field or (default_field if default_field in names else None)
    else:
        columns = _dataset_columns(source)
    messages = fields.messages or "messages"
    prompt, completion = fields.prompt or "prompt", fields.completion or "completion"
    if messages in columns:
        examples, field, kind = _chat_examples(source, columns, messages), messages, "chat"
    elif prompt in columns and completion in columns:
        examples = _completion_examples(source, columns, prompt, completion)
        field, kind = f"{prompt},{completion}", "completion"
    else:
        for flag, name in (
            ("--messages-field", fields.messages),
            ("--prompt-field", fields.prompt),
            ("--completion-field", fields.completion),
        ):
            if name is not None:
                raise UserError(
                    f"{source} has no field {name!r} ({flag}); its fields are: "
                    f"{', '.join(columns) or 'none'}"
                )
        field, kind = _pick_field(source, columns, text_field), "text"
        examples = [
            Example(completion=t) for t in columns[field] if isinstance(t, str) and t.strip()
        ]
    if fields.choices is not None:
        examples = _with_choices(source, columns, fields.choices, examples, kind)
    if max_samples is not None:
        examples = examples[:max_samples]
    if not examples:
        raise UserError(f"{source} has no non-empty examples in field {field!r}")
    return Texts(source=source, examples=examples, field=field, format=kind)


def _mixed(source: str, row: int, kind: str, wanted: str) -> UserError:
    return UserError(
        f"{source}: row {row + 1} has no {wanted}, but the dataset is {kind} data (it has those "
        "fields): a dataset must keep to one format (text, prompt/completion, or messages)"
    )


def _completion_examples(
    source: str, columns: dict[str, list[Any]], prompt: str, completion: str
) -> list[Example]:
    examples = []
    for i, (p, c) in enumerate(zip(columns[prompt], columns[completion], strict=True)):
        if not isinstance(p, str) or not isinstance(c, str):
            raise _mixed(source, i, "prompt/completion", f"{prompt!r} and {completion!r} texts")
        if not c.strip():
            raise UserError(f"{source}: row {i + 1} has an empty completion (nothing to score)")
        examples.append(Example(completion=c, prompt=p))
    return examples


def _chat_examples(source: str, columns: dict[str, list[Any]], field: str) -> list[Example]:
    examples = []
    for i, conversation in enumerate(columns[field]):
        if not isinstance(conversation, list) or not conversation:
            raise _mixed(source, i, "chat", f"{field!r} list of messages")
        turns = []
        for message in conversation:
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise UserError(
                    f"{source}: row {i + 1}: each message needs a role ({', '.join(ROLES)}) and "
                    "text content"
                )
            turns.append((role, content))
        if not any(role == "assistant" for role, _ in turns):
            raise UserError(
                f"{source}: row {i + 1} has no assistant turn: a conversation trains on what "
                "the assistant says"
            )
        examples.append(Example(messages=tuple(turns)))
    return examples


def _with_choices(
    source: str, columns: dict[str, list[Any]], field: str, examples: list[Example], kind: str
) -> list[Example]:
    if field not in columns:
        raise UserError(
            f"{source} has no field {field!r} (--choices-field); its fields are: "
            f"{', '.join(columns)}"
        )
    if kind == "text":
        raise UserError(
            f"--choices-field needs prompt/completion or chat data; {source} holds plain text"
        )
    out = []
    for i, (example, options) in enumerate(zip(examples, columns[field], strict=True)):
        if (
            not isinstance(options, list)
            or len(options) < 2
            or not all(isinstance(o, str) and o.strip() for o in options)
        ):
            raise UserError(
                f"{source}: row {i + 1}: {field!r} must be a list of at least two non-empty "
                "candidate texts"
            )
        out.append(replace(example, choices=tuple(dict.fromkeys(options))))
    return out


def split_heldout(texts: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
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
