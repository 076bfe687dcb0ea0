"""A run that chooses its method and learning rate on the user's own data (``--search``).

Prompt methods are sensitive to the learning rate, and which rate (and which method) suits a task
cannot be known for sure in advance. So before training, a run asked to search (on
prompt/completion or chat data) tries the candidates (``CANDIDATES``) its settings leave open on
its own data:

1. a search part is split off the training rows (``search_rows``: at least ``MIN_SEARCH_ROWS``,
   at most half of them; split by label on a classification, so every label is on both sides);
2. each candidate trains a short trial on the rest, and is scored on the search part by the
   held-out loss;
3. successive halving: after each round the better half goes on for another round, until one
   is left; the last two are scored by the task's own metric as well (``judge.task_judge``:
   accuracy among the labels, or exact match of short answers), which decides only where the
   rows right with one trial alone outnumber those right with the other beyond noise
   (``settle``): on a search part of 30 rows, a row or two apart is a reshuffle, not a
   difference, and the loss decides; the rounds and their evaluations, counted in training
   steps, take at most the steps of the run itself, so a searched run takes about twice an
   unsearched one, and the same data and seed choose the same winner on any machine;
4. the winner is trained afresh on all the training rows, as a run pinned to its settings would.

The trials and why the winner won are in the run's output and its ``training_config.json``.
Runs do not search unless asked: on generated tasks it never beat the defaults, and once (before
``settle``) chose worse by one row of the search part (docs/benchmarks/tasks.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..data import Example, as_example
from ..errors import UserError
from ..prompt import SoftPromptModel
from .config import RunConfig, Task, TrainConfig, is_task_data
from .judge import Judge, task_judge


@dataclass(frozen=True)
class Candidate:
    """One setting a search tries: a method, its reparameterisation and a learning rate."""

    method: str
    lr: float
    reparam: str = "none"

    @property
    def label(self) -> str:
        how = self.method + (f"+{self.reparam}" if self.reparam != "none" else "")
        return f"{how} lr {self.lr:g}"


CANDIDATES = (
    Candidate("prefix", 1e-2),
    Candidate("prefix", 3e-2),
    Candidate("prompt", 3e-2, "residual"),
    Candidate("prompt", 1e-1, "residual"),
)
"""What a search tries when the user left both the method and the rate open."""
MIN_SEARCH_ROWS = 30
"""Fewest training rows the trials are scored on (at most half the training rows)."""
SEARCH_FRACTION = 0.2
"""Share of the training rows the trials are scored on, when above ``MIN_SEARCH_ROWS``."""


def candidates(
    asked: TrainConfig, formats: Sequence[str], source_method: str | None
) -> list[Candidate]:
    """The candidates a run tries: those of ``CANDIDATES`` that fit what the user asked (a
    method, a reparameterisation, a rate, an adapter to continue). Fewer than two: no search."""
    if not is_task_data(formats):
        return []
    method = asked.method or source_method
    out = []
    for c in CANDIDATES:
        if method is not None and c.method != method:
            continue
        if asked.reparam is not None and c.method == "prompt" and c.reparam != asked.reparam:
            c = replace(c, reparam=asked.reparam)
        if asked.lr is not None:
            c = replace(c, lr=asked.lr)
        if c not in out:
            out.append(c)
    return out if len(out) > 1 else []


def search_split(
    texts: Sequence[Example], judge: Judge | None, seed: int
) -> tuple[list[Example], list[Example]]:
    """The trials' training rows and the rows they are scored on: ``SEARCH_FRACTION`` of the
    rows, at least ``MIN_SEARCH_ROWS``, at most half; on a classification each label's rows are
    split alike, so every label is on both sides."""
    n = len(texts)
    share = min(n // 2, max(MIN_SEARCH_ROWS, round(n * SEARCH_FRACTION))) / max(n, 1)
    rng = random.Random(seed)
    if judge is not None and judge.metric == "choice":
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            groups.setdefault(t.completion, []).append(i)
    else:
        groups = {"": list(range(n))}
    held: set[int] = set()
    for members in groups.values():
        rng.shuffle(members)
        take = round(len(members) * share)
        held.update(members[: min(take, len(members) - 1)])
    return (
        [t for i, t in enumerate(texts) if i not in held],
        [t for i, t in enumerate(texts) if i in held],
    )


@dataclass
class Trial:
    """One candidate's trial: its settings and its score after each round it ran."""

    candidate: Candidate
    config: RunConfig
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Per round: the steps trained so far, the metric (None: not scored by it) and the loss."""
    hits: list[bool] = field(default_factory=list)
    """Whether each search row was right by the metric, after the last round that scored it."""


NOISE = 3.84
"""McNemar's statistic (one degree of freedom, 95%) above which two trials' metrics differ by
more than the search part's noise."""


def settle(a: Trial, b: Trial) -> tuple[Trial, str]:
    """The better of the last two trials, and why: the one the metric prefers where the rows
    only it gets right outnumber those only the other gets right beyond noise (McNemar's test
    on those rows, ``NOISE``), else the one with the lower held-out loss."""
    by_loss = min((a, b), key=lambda t: (t.rounds[-1]["loss"], -(t.rounds[-1]["metric"] or 0.0)))
    if not (a.hits and b.hits):  # no task metric for this data
        return by_loss, "loss"
    only_a = sum(x and not y for x, y in zip(a.hits, b.hits, strict=True))
    only_b = sum(y and not x for x, y in zip(a.hits, b.hits, strict=True))
    n = len(a.hits)
    differ = only_a + only_b
    if differ and (only_a - only_b) ** 2 / differ > NOISE:
        winner, loser = (a, b) if only_a > only_b else (b, a)
        most, least = max(only_a, only_b), min(only_a, only_b)
        return winner, (
            f"metric: {most} rows of {n} right with it alone, {least} with "
            f"{loser.candidate.label} alone"
        )
    return by_loss, (
        f"loss: the metric told them apart by {abs(only_a - only_b)} of {n} rows, within noise"
    )


@dataclass
class SearchResult:
    """What a search tried and chose; ``as_json`` is what ``training_config.json`` records."""

    trials: list[Trial]
    winner: Trial
    judged_by: str
    train_rows: int
    search_rows: int
    steps_per_round: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "winner": self.winner.candidate.label,
            "judged_by": self.judged_by,
            "trial_rows": self.train_rows,
            "search_rows": self.search_rows,
            "steps_per_round": self.steps_per_round,
            "seconds": round(self.seconds, 1),
            "trials": [
                {
                    "method": t.candidate.method,
                    "reparam": t.candidate.reparam,
                    "lr": t.candidate.lr,
                    "rounds": t.rounds,
                    "won": t is self.winner,
                }
                for t in self.trials
            ],
        }

    def summary(self) -> str:
        """One line: the winner, then every trial's last score."""

        def score(t: Trial) -> str:
            last = t.rounds[-1]
            shown = f"loss {last['loss']:.3f}"
            if last["metric"] is not None:
                shown = f"{last['metric']:.2f}, {shown}"
            return f"{t.candidate.label} ({shown} after {int(last['steps'])} steps)"

        others = [score(t) for t in self.trials if t is not self.winner]
        return (
            f"search: {score(self.winner)} won, by {self.judged_by}; on {self.search_rows} rows "
            f"held out of the trials' {self.train_rows}; the others: {', '.join(others)}; "
            f"{self.seconds:.0f} s"
        )


def run_search(
    spm: SoftPromptModel,
    tasks: Sequence[tuple[str, Sequence[Example]]],
    asked: TrainConfig,
    config: RunConfig,
    trials: Sequence[Candidate],
    starts: Callable[[RunConfig], list[torch.Tensor]],
    resolve: Callable[[TrainConfig], RunConfig],
    progress: bool = True,
) -> SearchResult:
    """Try ``trials`` on ``tasks`` (name and training rows, the run's held-out part left out)
    by successive halving and return the winner; nothing is left in ``spm``.

    Args:
        asked: the settings the user asked for (None where open).
        config: the run's settings as resolved without a search: its epochs, batch size and
            length are the trials' too.
        starts: each task's starting rows for a candidate's settings.
        resolve: the complete settings of a candidate (``TrainConfig.resolve`` on the run's data).
    """
    from tqdm.auto import tqdm

    from .distributed import SINGLE
    from .train import _Run, epoch_batches

    began = time.perf_counter()
    examples = [[as_example(t) for t in texts] for _, texts in tasks]
    judges = [task_judge(spm, rows, rows) for rows in examples]
    splits = [
        search_split(rows, judge, config.seed) for rows, judge in zip(examples, judges, strict=True)
    ]
    if any(len(held) < 1 or len(kept) < 1 for kept, held in splits):
        raise UserError("too few training rows to search on; pin --method and --lr")
    judges = [
        task_judge(spm, kept, held) if judge is not None else None
        for judge, (kept, held) in zip(judges, splits, strict=True)
    ]
    # The run's own steps: the rounds of all trials together take at most as many.
    per_epoch = math.ceil(sum(len(rows) for rows in examples) / config.batch_size)
    total = per_epoch * config.epochs
    pool: list[Trial] = [
        Trial(c, replace(resolve(asking(asked, c)), keep="last", patience=0, compile=False))
        for c in trials
    ]
    # The budget: the run's own steps, evaluations counted in steps too, so that a searched
    # run takes about twice an unsearched one; counted, not timed, so the same data and seed
    # choose the same winner on any machine.
    search_rows = sum(len(h) for _, h in splits)
    by_loss = _evaluation_steps(search_rows, config.batch_size, 0.0)
    by_metric = _evaluation_steps(search_rows, config.batch_size, _metric_cost(judges))
    rounds, alive = [], len(pool)
    while alive > 1:
        rounds.append(alive)
        alive = math.ceil(alive / 2)
    evaluations = sum(n * (by_metric if n <= 2 else by_loss) for n in rounds)
    steps = max(1, int((total - evaluations) / sum(rounds)))
    runs: dict[int, tuple[Any, Iterator[Any]]] = {}
    bar = tqdm(
        total=steps * sum(rounds),
        desc="search",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    alive_trials = list(pool)
    judged_by = "loss"
    try:
        for size in rounds:  # ``size`` trials this round; the better half go on
            # Every round is scored by held-out loss; the last (two trials) by the task's metric
            # too, which costs a forward per label or answer token, and ``settle`` decides it.
            final = size <= 2
            for trial in alive_trials:
                index = pool.index(trial)
                bar.set_description(
                    f"search: trial {index + 1}/{len(pool)}, {trial.candidate.label}"
                )
                names = _names(tasks, index)
                if index not in runs:
                    run = _Run(
                        spm,
                        [
                            Task(name, start, kept, held)
                            for name, start, (kept, held) in zip(
                                names, starts(trial.config), splits, strict=True
                            )
                        ],
                        trial.config,
                        None,
                        SINGLE,
                    )
                    run.begin(None, trial=True)
                    runs[index] = (run, _endless(run, epoch_batches))
                run, batches = runs[index]
                for _ in range(steps):
                    run.train_step(next(batches), 1)
                    bar.update(1)
                scored, trial.hits = _score(spm, run, names, splits, judges if final else None)
                trial.rounds.append(scored)
            if len(alive_trials) == 2:
                best, judged_by = settle(*alive_trials)
                alive_trials = [best]
            else:
                alive_trials = sorted(alive_trials, key=lambda t: t.rounds[-1]["loss"])
                alive_trials = alive_trials[: math.ceil(size / 2)]
    finally:
        bar.close()
        # Trials' adapters go last, once: removing one moves the virtual ids of those after it.
        for index in range(len(pool)):
            for name in _names(tasks, index):
                if name in spm.adapters:
                    spm.remove_adapter(name)
    (winner,) = alive_trials
    return SearchResult(
        trials=pool,
        winner=winner,
        judged_by=judged_by,
        train_rows=sum(len(k) for k, _ in splits),
        search_rows=search_rows,
        steps_per_round=steps,
        seconds=time.perf_counter() - began,
    )


def asking(asked: TrainConfig, c: Candidate) -> TrainConfig:
    """The user's settings with a candidate's filled in."""
    reparam = c.reparam if c.method == "prompt" else None
    return replace(asked, method=c.method, lr=c.lr, reparam=reparam)


def winner_of(record: dict[str, Any]) -> Candidate:
    """The winning candidate of a search's record (``SearchResult.as_json``)."""
    trial = next(t for t in record["trials"] if t.get("won"))
    return Candidate(trial["method"], float(trial["lr"]), trial["reparam"])


def _evaluation_steps(search_rows: int, batch_size: int, metric_cost: float) -> float:
    """What one trial's evaluation costs in training steps: a forward per search row (per
    label or answer token as well, ``metric_cost``, where the metric judges), a step being a
    forward and a backward (about three forwards) of a batch of rows of the same length."""
    return search_rows * (1.0 + metric_cost) / (3.0 * batch_size)


def _metric_cost(judges: Sequence[Judge | None]) -> float:
    """Roughly how many loss evaluations the task's metric costs: one per label (each row is
    scored with every label), or one per answer token generated (exact match)."""
    costs = [
        float(len(j.labels)) if j.metric == "choice" else float(j.max_new_tokens)
        for j in judges
        if j is not None
    ]
    return sum(costs) / len(costs) if costs else 0.0


def _endless(run: Any, epoch_batches: Any) -> Iterator[Any]:
    """A trial's batches, epoch after epoch, in the run's own order."""
    while True:
        yield from epoch_batches(run.rows, run.global_batch, run.order, run.config.group_by_length)


def _score(
    spm: SoftPromptModel,
    run: Any,
    names: list[str],
    splits: list[tuple[list[Example], list[Example]]],
    judges: list[Judge | None] | None,
) -> tuple[dict[str, float], list[bool]]:
    """A trial's loss over its tasks' search rows and their mean metric (None: no judges), and
    whether each row was right (every task's rows in turn; none without judges)."""
    run.held_out(1)
    losses = [res.evals[-1]["loss"] for res in run.results]
    metrics, hits = [], []
    for name, (_, held), judge in zip(names, splits, judges or [None] * len(names), strict=True):
        if judge is not None:
            right = judge.hits(spm, name, held)
            metrics.append(sum(right) / len(right))
            hits.extend(right)
    scored = {
        "steps": run.step,
        "metric": sum(metrics) / len(metrics) if metrics else None,
        "loss": sum(losses) / len(losses),
    }
    return scored, hits


def _names(tasks: Sequence[tuple[str, Any]], index: int) -> list[str]:
    """The adapter names of trial ``index``'s prompts (one per task)."""
    return [f"{name}.trial{index}" for name, _ in tasks]
