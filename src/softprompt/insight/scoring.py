"""Task metrics on prompt/completion and chat data: rank classification, exact match, and
whether a reply has a pattern.

A chat row is judged on its last assistant turn: the conversation before it is the prompt
(in the chat template, as the chat endpoint sends it) and the turn's text the reference.
``choice`` scores every candidate completion of a row by its log-likelihood after the row's
prompt, as lm-evaluation-harness does for multiple-choice tasks: the sum over the candidate's
tokens (``accuracy``), and that sum divided by the candidate's length in characters
(``accuracy_norm``, lm-eval's ``acc_norm``). The candidates of all rows run through the model
in shared batches. ``exact`` generates greedily through the engine and compares the completion
with the reference after normalising case and whitespace; ``pattern`` counts the greedy
completions in which a regular expression is found (a format or a behaviour the prompt was
tuned for).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import Example
from ..engine import SamplingParams
from ..errors import UserError
from ..layout import example_layout
from ..prompt import SoftPromptModel
from ..rows import MAX_LENGTH_CAP, Row, batch_loss, fitting_length

METRICS = ("loss", "choice", "exact", "pattern")


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
    """``exact``, ``pattern``: a few rows whose completion missed."""
    context: str | None = None
    """What stood before each prompt for a baseline (``instruction``, ``8-shot``); None: none."""
    hits: list[bool] = field(default_factory=list, repr=False)
    """Whether each row was right, in order (not written out: ``accuracy`` says it in short)."""

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
        if self.metric in ("exact", "pattern"):
            out["misses"] = self.misses
        return out


def task_rows(examples: Sequence[Example]) -> list[Example]:
    """``examples`` as task rows: prompt/completion rows as they are; a conversation as the
    turns before its last assistant turn, with that turn's text as the reference completion.

    Raises:
        UserError: plain-text data (it has no prompt to answer).
    """
    if not examples or any(e.format == "text" for e in examples):
        raise UserError(
            "task metrics and baselines need prompt/completion or chat data (a prompt and its "
            "reference answer per row)"
        )
    rows = []
    for e in examples:
        if e.messages is None or e.completion:
            rows.append(e)
            continue
        last = max(i for i, (role, _) in enumerate(e.messages) if role == "assistant")
        rows.append(
            Example(completion=e.messages[last][1], messages=e.messages[:last], choices=e.choices)
        )
    return rows


def _label(example: Example) -> str:
    """How a row is named in a miss: its prompt, or its conversation's last message."""
    return example.messages[-1][1] if example.messages else example.prompt


def _requests(rows: Sequence[Example], adapter: str | None) -> list[Any]:
    from ..generation import Request

    return [Request(_label(e), adapter, messages=e.messages) for e in rows]


@dataclass
class ChoiceScores:
    """Every candidate's log-likelihood under each of several prompts (``choice_scores``)."""

    members: list[str | None]
    gold: list[str]
    options: list[list[str]]
    """Each row's candidates."""
    loglik: torch.Tensor
    """(prompts, candidates of every row, row-major): summed over each candidate's tokens."""

    def picks(self, members: Sequence[int] | None = None, norm: bool = False) -> list[str]:
        """Each row's pick by the log-likelihoods summed over ``members`` (indices; default
        all): a prompt ensemble; ``norm`` divides by the candidate's length in characters."""
        chosen = list(range(len(self.members))) if members is None else list(members)
        total = self.loglik[chosen].sum(0).tolist()
        out, at = [], 0
        for options in self.options:
            mine = total[at : at + len(options)]
            at += len(options)
            if norm:
                mine = [ll / max(1, len(c)) for ll, c in zip(mine, options, strict=True)]
            out.append(options[max(range(len(options)), key=mine.__getitem__)])
        return out

    def accuracy(self, members: Sequence[int] | None = None, norm: bool = False) -> float:
        """The share of rows whose pick (``picks``) is the reference."""
        hits = sum(g == p for g, p in zip(self.gold, self.picks(members, norm), strict=True))
        return hits / len(self.gold)

    def result(self, members: Sequence[int] | None = None, data_name: str = "") -> TaskResult:
        """``choice_accuracy``'s result for the prompts ``members`` (indices; default all)."""
        chosen = list(range(len(self.members))) if members is None else list(members)
        names = [self.members[i] for i in chosen]
        picked = self.picks(chosen)
        hits = [g == p for g, p in zip(self.gold, picked, strict=True)]
        labels: dict[str, dict[str, int]] = {}
        if all(o == self.options[0] for o in self.options):
            confusion: dict[str, Counter[str]] = {c: Counter() for c in self.options[0]}
            for g, p in zip(self.gold, picked, strict=True):
                confusion[g][p] += 1
            labels = {c: dict(confusion[c]) for c in self.options[0]}
        return TaskResult(
            adapter=names[0] if len(names) == 1 else f"ensemble({', '.join(map(str, names))})",
            data=data_name,
            metric="choice",
            accuracy=sum(hits) / len(self.gold),
            accuracy_norm=self.accuracy(chosen, norm=True),
            n=len(self.gold),
            labels=labels,
            hits=hits,
        )


def _begin_alike(laid: Sequence[Any], counts: Sequence[int]) -> bool:
    """Whether some row's candidates (``counts`` of them per row, in ``laid`` row-major) include
    one whose scored tokens are the start of another's."""
    at = 0
    for count in counts:
        tails = [
            tuple(t for t, scored in zip(lay.ids, lay.scored, strict=True) if scored)
            for lay in laid[at : at + count]
        ]
        at += count
        for a in tails:
            if any(len(a) < len(b) and b[: len(a)] == a for b in tails):
                return True
    return False


def choice_scores(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapters: Sequence[str | None],
    data_name: str = "",
    choices: list[str] | None = None,
    batch_size: int = 32,
) -> ChoiceScores:
    """The log-likelihood of every row's candidates (``choice_accuracy`` says which) under each
    of ``adapters``, each candidate after its row's prompt, all prompts run in shared batches.
    Any group of the prompts can then be scored as an ensemble without running the model again.

    Raises:
        UserError: as ``choice_accuracy``.
    """
    rows = task_rows(examples)
    shared = list(dict.fromkeys(choices or [e.completion for e in rows]))
    per_row = [list(e.choices) if e.choices else shared for e in rows]
    if any(len(c) < 2 for c in per_row):
        raise UserError("--metric choice needs at least two candidate completions (--choices)")
    for i, (e, options) in enumerate(zip(rows, per_row, strict=True)):
        if e.completion not in options:
            where = f"row {i + 1}'s candidates" if e.choices else "--choices"
            raise UserError(f"{data_name}: the reference {e.completion!r} is not among {where}")
    if not adapters:
        raise UserError("a prompt ensemble needs at least one adapter")
    layouts = [
        Example(completion=c, prompt=e.prompt, messages=e.messages)
        for e, options in zip(rows, per_row, strict=True)
        for c in options
    ]  # row-major: row i's candidates, then row i+1's ...
    max_length = fitting_length(spm, layouts, cap=MAX_LENGTH_CAP)
    laid = [example_layout(spm.tokenizer, e, max_length, eos=False) for e in layouts]
    if _begin_alike(laid, [len(options) for options in per_row]):
        # A candidate whose tokens begin another's never scores below it on its own tokens, so
        # the longer could never be chosen: score each with the end of the answer (EOS), as
        # training scores it.
        laid = [example_layout(spm.tokenizer, e, max_length, eos=True) for e in layouts]
    scored: list[Row] = []
    for member in adapters:  # member-major: every candidate under the first prompt, then ...
        virtual = spm.virtual_ids(member)
        scored += [(virtual + lay.ids, len(virtual), lay.scored) for lay in laid]
    parts = []
    with torch.no_grad():
        for start in range(0, len(scored), batch_size):
            loss, _ = batch_loss(spm, scored[start : start + batch_size], False, per_row=True)
            parts.append(loss.float())
    return ChoiceScores(
        members=list(adapters),
        gold=[e.completion for e in rows],
        options=per_row,
        loglik=(-torch.cat(parts)).reshape(len(adapters), len(laid)),
    )


def choice_accuracy(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapter: str | None | Sequence[str],
    data_name: str = "",
    choices: list[str] | None = None,
    batch_size: int = 32,
) -> TaskResult:
    """Rank classification of ``examples`` among their candidates: a row's own ``choices``
    (``--choices-field``), else ``choices``, else the distinct completions of the data in order
    of first appearance. The confusion matrix is kept when all rows share one set of labels.

    ``adapter`` may name several adapters: a prompt ensemble (Lester et al. 2021, section 7),
    each candidate scored by the sum of its log-likelihoods under every prompt (the product of
    their probabilities), each prompt's candidates run once (``choice_scores``), in shared
    batches.

    Raises:
        UserError: plain-text data, fewer than two candidates, or a reference completion that
            is not among its row's candidates.
    """
    members = [adapter] if adapter is None or isinstance(adapter, str) else list(adapter)
    return choice_scores(spm, examples, members, data_name, choices, batch_size).result(
        data_name=data_name
    )


def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space, no space at the ends."""
    return " ".join(text.lower().split())


def first_line(text: str) -> str:
    """The first line of ``text`` that is not blank, normalised (``normalise``)."""
    return normalise(text.strip().split("\n", 1)[0])


def exact_match(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapter: str | None,
    data_name: str = "",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    shown: int = 3,
    first_lines: bool = False,
) -> TaskResult:
    """Greedy completions of every prompt through the engine, compared with the references;
    with ``first_lines``, on their first lines only: a short answer judged as the task suite
    judges it (``bench_tasks.py``), whatever the reply says after it."""

    def equal(reply: str, row: Example) -> bool:
        if first_lines:
            return first_line(reply) == first_line(row.completion)
        return normalise(reply) == normalise(row.completion)

    return _graded(
        spm, examples, adapter, "exact", equal, data_name, max_new_tokens, batch_size, shown
    )


def compile_pattern(pattern: str | None) -> re.Pattern[str]:
    """``--pattern`` as a regular expression.

    Raises:
        UserError: no pattern, or not a valid regular expression.
    """
    if not pattern:
        raise UserError("--metric pattern needs --pattern REGEX (what a good reply contains)")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--pattern {pattern!r} is not a regular expression: {exc}") from exc


def pattern_match(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapter: str | None,
    pattern: str,
    data_name: str = "",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    shown: int = 3,
) -> TaskResult:
    """The share of greedy completions in which ``pattern`` is found (``re.search``, so
    ``^`` anchors it at the completion's start)."""
    regex = compile_pattern(pattern)

    def found(reply: str, row: Example) -> bool:
        return regex.search(reply) is not None

    return _graded(
        spm, examples, adapter, "pattern", found, data_name, max_new_tokens, batch_size, shown
    )


def _graded(
    spm: SoftPromptModel,
    examples: Sequence[Example],
    adapter: str | None,
    metric: str,
    hit: Callable[[str, Example], bool],
    data_name: str,
    max_new_tokens: int,
    batch_size: int,
    shown: int,
) -> TaskResult:
    """Greedy completions of every row through the engine, each judged by ``hit``."""
    from ..generation import generate

    rows = task_rows(examples)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs = generate(spm, _requests(rows, adapter), params, batch_size)
    hits = [hit(o, e) for o, e in zip(outputs, rows, strict=True)]
    return TaskResult(
        adapter=adapter,
        data=data_name,
        metric=metric,
        accuracy=sum(hits) / len(rows),
        n=len(rows),
        misses=_misses(rows, outputs, hits, shown),
        hits=hits,
    )


def _misses(
    rows: Sequence[Example], outputs: Sequence[str], hits: Sequence[bool], shown: int
) -> list[dict[str, str]]:
    return [
        {"prompt": _label(e), "reference": e.completion, "completion": o}
        for e, o, hit in zip(rows, outputs, hits, strict=True)
        if not hit
    ][:shown]


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
    """``examples`` (task rows) with the instruction and the shots before each prompt: the
    zero- and few-shot baselines. Text prompts get the instruction and each shot's prompt and
    completion, a blank line between parts; conversations get the instruction as a system
    message and each shot as earlier turns."""
    if any(e.messages is not None for e in examples):
        system = (("system", instruction.strip()),) if instruction and instruction.strip() else ()
        turns = tuple(t for s in shots for t in (*(s.messages or ()), ("assistant", s.completion)))
        return [
            Example(
                completion=e.completion,
                messages=(*system, *turns, *(e.messages or ())),
                choices=e.choices,
            )
            for e in examples
        ]
    lead = [instruction.strip()] if instruction and instruction.strip() else []
    lead += [s.prompt + s.completion for s in shots]
    head = "\n\n".join(lead)
    return [
        Example(
            completion=e.completion,
            prompt=f"{head}\n\n{e.prompt}" if head else e.prompt,
            choices=e.choices,
        )
        for e in examples
    ]
