"""Task metrics on prompt/completion data: rank classification and exact match.

``choice`` scores every candidate completion of a row by its log-likelihood after the row's
prompt, as lm-evaluation-harness does for multiple-choice tasks: the sum over the candidate's
tokens (``accuracy``), and that sum divided by the candidate's length in characters
(``accuracy_norm``, lm-eval's ``acc_norm``). The candidates of all rows run through the model
in shared batches. ``exact`` generates greedily through the engine and compares the completion
with the reference after normalising case and whitespace.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import Example
from .engine import SamplingParams
from .errors import UserError
from .evaluate import MAX_LENGTH_CAP, Row, batch_loss, fitting_length
from .layout import example_layout
from .prompt import SoftPromptModel

METRICS = ("loss", "choice", "exact")


@dataclass
class TaskResult:
    """One adapter's accuracy on one dataset under one metric."""

    adapter: str | None
    data: str
    metric: str
    accuracy: float
    n: int
    accuracy_norm: float | None = None
    """``choice`` only: the candidates' log-likelihoods divided by their length in characters."""
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    """``choice``: per gold label, how often each label was chosen (the confusion matrix)."""
    misses: list[dict[str, str]] = field(default_factory=list)
    """``exact``: a few rows whose completion differed from the reference."""
    context: str | None = None
    """What stood before each prompt for a baseline (``instruction``, ``8-shot``); None: none."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "adapter": self.adapter,
            "data": self.data,
            "metric": self.metric,
            "accuracy": self.accuracy,
            "n": self.n,
            "context": self.context,
        }
        if self.metric == "choice":
            out["accuracy_norm"] = self.accuracy_norm
            out["labels"] = self.labels
        if self.metric == "exact":
            out["misses"] = self.misses
        return out


def _completion_rows(examples: Sequence[Example], metric: str) -> list[Example]:
    if not examples or any(e.format != "completion" for e in examples):
        raise UserError(
            f"--metric {metric} needs prompt/completion data (a prompt and its reference "
            "completion per row)"
        )
    return list(examples)


def choice_accuracy(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapter: str | None,
    data_name: str = "",
    choices: list[str] | None = None,
    batch_size: int = 32,
) -> TaskResult:
    """Rank classification of ``examples`` among ``choices`` (default: the distinct
    completions of the data, in order of first appearance).

    Raises:
        UserError: not prompt/completion data, fewer than two candidates, or a reference
            completion that is not among ``choices``.
    """
    rows = _completion_rows(examples, "choice")
    candidates = list(dict.fromkeys(choices or [e.completion for e in rows]))
    if len(candidates) < 2:
        raise UserError("--metric choice needs at least two candidate completions (--choices)")
    missing = sorted({e.completion for e in rows} - set(candidates))
    if missing:
        raise UserError(f"{data_name}: the reference {missing[0]!r} is not among --choices")
    layouts = [
        Example(completion=c, prompt=e.prompt) for e in rows for c in candidates
    ]  # row-major: row i's candidates at i * len(candidates) ...
    max_length = fitting_length(spm, layouts, cap=MAX_LENGTH_CAP)
    virtual = spm.virtual_ids(adapter)
    scored: list[Row] = []
    for example in layouts:
        layout = example_layout(spm.tokenizer, example, max_length, eos=False)
        scored.append((virtual + layout.ids, len(virtual), layout.scored))
    parts = []
    with torch.no_grad():
        for start in range(0, len(scored), batch_size):
            loss, _ = batch_loss(spm, scored[start : start + batch_size], False, per_row=True)
            parts.append(loss.float())
    loglik = -torch.cat(parts).view(len(rows), len(candidates))  # (N, C), on the model's device
    lengths = loglik.new_tensor([max(1, len(c)) for c in candidates])
    picked = loglik.argmax(dim=1).tolist()
    picked_norm = (loglik / lengths).argmax(dim=1).tolist()
    gold = [candidates.index(e.completion) for e in rows]
    confusion: dict[str, Counter[str]] = {c: Counter() for c in candidates}
    for g, p in zip(gold, picked, strict=True):
        confusion[candidates[g]][candidates[p]] += 1
    return TaskResult(
        adapter=adapter,
        data=data_name,
        metric="choice",
        accuracy=sum(g == p for g, p in zip(gold, picked, strict=True)) / len(rows),
        accuracy_norm=sum(g == p for g, p in zip(gold, picked_norm, strict=True)) / len(rows),
        n=len(rows),
        labels={c: dict(confusion[c]) for c in candidates},
    )


def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space, no space at the ends."""
    return " ".join(text.lower().split())


def exact_match(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapter: str | None,
    data_name: str = "",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    shown: int = 3,
) -> TaskResult:
    """Greedy completions of every prompt through the engine, compared with the references."""
    from .generate import Request, generate

    rows = _completion_rows(examples, "exact")
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs = generate(spm, [Request(e.prompt, adapter) for e in rows], params, batch_size)
    hits = [normalise(o) == normalise(e.completion) for o, e in zip(outputs, rows, strict=True)]
    misses = [
        {"prompt": e.prompt, "reference": e.completion, "completion": o}
        for e, o, hit in zip(rows, outputs, hits, strict=True)
        if not hit
    ][:shown]
    return TaskResult(
        adapter=adapter,
        data=data_name,
        metric="exact",
        accuracy=sum(hits) / len(rows),
        n=len(rows),
        misses=misses,
    )


def pick_shots(pool: Sequence[Example], k: int, seed: int = 0) -> list[Example]:
    """``k`` examples from ``pool`` for the context, balanced over its completions (labels):
    taken label by label in turn, each label's examples in a seeded order."""
    if k < 1:
        return []
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for example in pool:
        by_label.setdefault(example.completion, []).append(example)
    if sum(len(v) for v in by_label.values()) < k:
        raise UserError(f"--few-shot {k} needs {k} examples to draw from; there are {len(pool)}")
    for examples in by_label.values():
        rng.shuffle(examples)
    labels = list(by_label)
    rng.shuffle(labels)
    shots: list[Example] = []
    while len(shots) < k:
        for label in labels:
            if by_label[label] and len(shots) < k:
                shots.append(by_label[label].pop())
    rng.shuffle(shots)
    return shots


def in_context(
    examples: Sequence[Example], shots: Sequence[Example], instruction: str | None
) -> list[Example]:
    """``examples`` with the instruction and the shots (each its prompt, then its completion)
    before each prompt, a blank line between parts: the zero- and few-shot baselines."""
    lead = [instruction.strip()] if instruction and instruction.strip() else []
    lead += [s.prompt + s.completion for s in shots]
    head = "\n\n".join(lead)
    return [
        Example(completion=e.completion, prompt=f"{head}\n\n{e.prompt}" if head else e.prompt)
        for e in examples
    ]
