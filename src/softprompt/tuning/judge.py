"""The task metric a run may choose its kept rows by (``--keep metric``).

Held-out loss is a weak judge of a classification or a short answer: a prompt can lower the
loss of the right label while still ranking another above it. ``task_judge`` reads the
training data and picks what the task suite judges such data by: rank classification among
the training completions when they are a few labels that repeat, else exact match of the
reply's first line when every answer is short. Chat, plain text and long answers have no such
metric; their runs keep judging by held-out loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..data import Example, as_example
from ..prompt import SoftPromptModel

MAX_LABELS = 32
"""Most distinct completions a classification may have."""
MIN_PER_LABEL = 4
"""Training rows per label, on average, for the completions to be read as labels."""
MAX_ANSWER_TOKENS = 32
"""Longest held-out answer (tokens) exact match judges; longer ones are judged by loss."""


@dataclass(frozen=True)
class Judge:
    """How a run's held-out rows are scored: ``choice`` among ``labels``, or ``exact`` (first
    lines) on greedy replies of at most ``max_new_tokens``."""

    metric: str
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 0

    @property
    def description(self) -> str:
        if self.metric == "choice":
            return f"held-out accuracy among the {len(self.labels)} labels"
        return "held-out exact match of the reply's first line"

    def score(self, spm: SoftPromptModel, adapter: str, texts: Sequence[str | Example]) -> float:
        """The share of ``texts`` (held-out rows) that ``adapter`` gets right."""
        hits = self.hits(spm, adapter, texts)
        return sum(hits) / len(hits)

    def hits(
        self, spm: SoftPromptModel, adapter: str, texts: Sequence[str | Example]
    ) -> list[bool]:
        """Whether ``adapter`` gets each of ``texts`` (held-out rows) right, in order."""
        from ..insight.scoring import choice_accuracy, exact_match

        rows = [as_example(t) for t in texts]
        if self.metric == "choice":
            return choice_accuracy(spm, rows, adapter, choices=list(self.labels)).hits
        return exact_match(
            spm, rows, adapter, max_new_tokens=self.max_new_tokens, shown=0, first_lines=True
        ).hits


def task_judge(
    spm: SoftPromptModel, texts: Sequence[str | Example], eval_texts: Sequence[str | Example]
) -> Judge | None:
    """The metric ``texts`` (training) and ``eval_texts`` (held out) are judged by, or None
    where there is none (chat, plain text, long answers): the run then judges by loss."""
    train = [as_example(t) for t in texts]
    held = [as_example(t) for t in eval_texts]
    if not train or not held or any(e.format != "completion" for e in (*train, *held)):
        return None
    labels = tuple(dict.fromkeys(e.completion for e in train))
    if (
        2 <= len(labels) <= MAX_LABELS
        and len(labels) * MIN_PER_LABEL <= len(train)
        and all(e.completion in labels for e in held)
    ):
        return Judge("choice", labels=labels)
    longest = max(len(spm.tokenizer(e.completion.strip()).input_ids) for e in held)
    if longest > MAX_ANSWER_TOKENS:
        return None
    return Judge("exact", max_new_tokens=longest + 2)
