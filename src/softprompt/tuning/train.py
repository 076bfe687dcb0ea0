"""Training a soft prompt: only its rows get gradients; the base model stays frozen.

``train(spm, name, initial, texts, eval_texts, config)`` is one plain loop (AdamW on the prompt
rows, cross-entropy on the text tokens); ``train_tasks`` trains several prompts in one run.
Saving is ``save.py``'s; a whole run as the command line makes it is ``run.py``'s.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..adapters import Adapter
from ..data import Example, as_example
from ..errors import UserError
from ..insight.evaluate import evaluate
from ..prompt import SoftPromptModel
from ..rows import batch_loss, fitting_length, scored_tokens, training_rows
from .config import EXTEND_MIN_GAIN, EXTEND_PATIENCE, RunConfig, Task, TrainConfig, TrainResult
from .distributed import SINGLE, Group
from .distributed import sum_ as dist_sum
from .judge import Judge, task_judge
from .reparam import Residual
from .save import method_config


def trainable_summary(trainable: int, total: int) -> str:
    """The line PEFT's ``print_trainable_parameters`` prints."""
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


def train(
    spm: SoftPromptModel,
    name: str,
    initial: torch.Tensor,
    texts: Sequence[str | Example],
    eval_texts: Sequence[str | Example],
    config: TrainConfig,
    progress: bool = True,
    checkpoints: Path | None = None,
    resume: bool = False,
    group: Group = SINGLE,
) -> TrainResult:
    """Add adapter ``name`` with rows ``initial`` to ``spm`` and train it on ``texts``.

    The rows kept at the end (loaded in ``spm`` under ``name``) are those of the best held-out
    evaluation (the loss log's ``best_step``), which may be the starting rows themselves.
    ``train_tasks`` with one task; see it for the arguments.
    """
    task = Task(name=name, initial=initial, texts=texts, eval_texts=eval_texts)
    return train_tasks(spm, [task], config, progress, checkpoints, resume, group)[0]


def train_tasks(
    spm: SoftPromptModel,
    tasks: list[Task],
    config: TrainConfig,
    progress: bool = True,
    checkpoints: Path | None = None,
    resume: bool = False,
    group: Group = SINGLE,
    record: dict[str, Any] | None = None,
) -> list[TrainResult]:
    """Train one prompt per task in one run over ``spm``: rows of all tasks share batches.

    Each step is one forward and backward over a batch drawn from all tasks' rows pooled; each
    task's loss is the mean over its own tokens in the batch, so its gradient is the one a batch
    of only its rows would give, whatever else shares the batch. A task with no row in a batch
    is not stepped (AdamW skips it). Each task is evaluated on its own held-out texts and keeps
    its own best rows; ``config.patience`` stops the run when no task has improved for that many
    evaluations. One task is plain single-prompt training.

    Args:
        checkpoints: folder for this run's checkpoint (``checkpoint.checkpoint_dir``); None
            writes none.
        resume: continue from the checkpoint there (same settings, data and model).
        group: the data-parallel process group (``distributed``): each process trains on its
            share of every batch of ``batch_size`` x processes rows; only rank 0 writes.
        record: what the run decided before training (a search's trials), kept in each
            checkpoint for a resumed run to read (``checkpoint.record``).

    Returns:
        One result per task, in order; each task's adapter is left in ``spm`` with its best rows.

    Raises:
        UserError: ``resume`` without a usable checkpoint (see ``checkpoint.load``).
    """
    from tqdm.auto import tqdm

    config = resolved(spm, config, tasks, group.world)
    run = _Run(spm, tasks, config, checkpoints, group)
    run.record = record
    state = run.checkpoint.load(checkpoints, run.fingerprint) if resume and checkpoints else None
    first_epoch, skip = run.begin(state)
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        desc=f"training {'+'.join(t.name for t in tasks)}",
        unit="step",
        disable=not (progress and group.main),
        dynamic_ncols=True,
    )
    stop = False
    epoch = first_epoch
    while epoch <= run.epochs:
        if epoch != first_epoch or state is None:
            run.epoch_rng = run.order.getstate()
        else:
            run.order.setstate(run.epoch_rng)
        batches = epoch_batches(run.rows, run.global_batch, run.order, config.group_by_length)
        for index, batch in enumerate(batches):
            if epoch == first_epoch and index < skip:
                continue
            run.train_step(batch, epoch)
            bar.update(1)
            run.show(bar, epoch, "loss")
            if config.eval_every and run.step % config.eval_every == 0:
                run.held_out(epoch)
                run.show(bar, epoch, "heldout")
                stop = run.stalled()
            if stop:
                break
            if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                run.save_checkpoint(epoch, index + 1, run.epoch_rng)
        if not config.eval_every and not stop:
            run.held_out(epoch)
            run.show(bar, epoch, "heldout")
            stop = run.stalled()
        if stop:
            for res in run.results:
                res.stopped_early = True
            break
        if epoch == run.epochs and run.improving():
            run.extend()
            bar.total = run.total_steps
            bar.set_description(
                f"training {'+'.join(t.name for t in tasks)} (held-out loss still improving: "
                f"epoch {epoch + 1}, at most {config.max_epochs})"
            )
            bar.refresh()
        run.save_checkpoint(epoch + 1, 0, run.order.getstate())
        epoch += 1
    for res in run.results:
        res.epochs_trained = min(epoch, run.epochs)
    bar.close()
    return run.finish()


def resolved(
    spm: SoftPromptModel, config: TrainConfig, tasks: Sequence[Task], world: int = 1
) -> RunConfig:
    """``config`` with every default decided by the tasks' data (``TrainConfig.resolve``); a
    ``RunConfig`` is already resolved. With no method asked for, the starting rows say which:
    rows as wide as the model's input embeddings are a prompt's, others a prefix's."""
    if isinstance(config, RunConfig):
        return config
    formats = [as_example(t.texts[0]).format if t.texts else "text" for t in tasks]
    fitted = None
    if config.max_length is None:
        fitted = fitting_length(spm, [text for t in tasks for text in t.texts])
    counts = {int(t.initial.shape[0]) for t in tasks}  # the rows it starts from decide
    # The caller made the starting rows for a method: rows of input embeddings are a prompt's.
    widths = {int(t.initial.shape[-1]) for t in tasks}
    method = None if not widths else "prompt" if widths == {spm.hidden_size} else "prefix"
    return config.resolve(
        formats,
        fitted_length=fitted,
        source_tokens=counts.pop() if len(counts) == 1 else None,
        source_method=method,
        rows_per_epoch=(sum(len(t.texts) for t in tasks), config.batch_size * world),
    )


class _Run:
    """One ``train_tasks`` run's state and bookkeeping: the prompts being trained, their
    optimiser and schedule, the pooled rows, each task's best rows and results, and the
    checkpoint that holds all of it. ``train_tasks`` is the loop over epochs and batches."""

    def __init__(
        self,
        spm: SoftPromptModel,
        tasks: list[Task],
        config: RunConfig,
        checkpoints: Path | None,
        group: Group,
    ) -> None:
        from . import checkpoint

        self.checkpoint = checkpoint
        self.spm, self.tasks, self.config = spm, tasks, config
        self.checkpoints, self.group = checkpoints, group
        self.n_tasks = len(tasks)
        self.fingerprint: dict[str, Any] = {
            "config": config.fingerprint(),
            "tasks": [t.name for t in tasks],
            "data": checkpoint.texts_digest(
                *(texts for t in tasks for texts in (t.texts, t.eval_texts))
            ),
            "model": spm.base.name,
            "hidden_size": spm.hidden_size,
            "vocab_size": spm.vocab_size,
            "virtual_tokens": [int(t.initial.shape[0]) for t in tasks],
            "processes": group.world,
            **({"sharded": True} if group.sharded else {}),
            # What changes the arithmetic: a resumed run on another dtype or device is another run.
            "dtype": str(spm.embedding.weight.dtype).removeprefix("torch."),
            "device": spm.device.type,
        }
        self.rows: list[tuple[list[int], int, list[bool], int]] = []  # ids, n_virtual, scored, task
        self.params: list[torch.Tensor] = []
        self.results: list[TrainResult] = []
        self.global_batch = config.batch_size * group.world
        self.order = random.Random(config.seed)
        self.epoch_rng = self.order.getstate()
        self.step = 0
        self.stepping = 0.0  # seconds spent in training steps (evaluations, checkpoints left out)
        self.start = time.perf_counter()  # the checkpoints' clock
        self.record: dict[str, Any] | None = None

    def begin(self, state: dict[str, Any] | None, trial: bool = False) -> tuple[int, int]:
        """Add the prompts (from ``state``'s rows when resuming), build the optimiser, the rows
        and the schedule, then evaluate the start or restore the checkpoint. Returns the epoch
        and the batch within it to start from. A search's ``trial`` neither evaluates the start
        nor checks the base weights (the run it chooses for does both)."""
        spm, config, tasks = self.spm, self.config, self.tasks
        torch.manual_seed(config.seed)
        if config.compile:
            spm.compile()
        self.params = [
            spm.add_adapter(
                Adapter(
                    name=t.name,
                    weights=state["rows"][i] if state is not None else t.initial,
                    config=method_config(spm, config, int(t.initial.shape[0])),
                ),
                trainable=True,
            )
            for i, t in enumerate(tasks)
        ]
        # --reparam residual: each task's rows trained through its own residual MLP
        self.reparams = [
            Residual(p.detach()) if config.reparam == "residual" else None for p in self.params
        ]
        if state is not None and state.get("reparams"):
            for module, saved in zip(self.reparams, state["reparams"], strict=True):
                if module is not None:
                    module.load_state_dict(saved)
        self.trained = [
            list(m.parameters()) if m is not None else [p]
            for p, m in zip(self.params, self.reparams, strict=True)
        ]
        """Per task, the tensors the optimiser steps (the rows, or the rows and their MLP)."""
        base_params = sum(p.numel() for p in spm.model.parameters())
        counts = [sum(p.numel() for p in group) for group in self.trained]
        self.results = [
            TrainResult(name=t.name, trainable_params=n, total_params=base_params + n)
            for t, n in zip(tasks, counts, strict=True)
        ]
        self.optimizer = torch.optim.AdamW(
            [p for group in self.trained for p in group],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        for i, (t, res) in enumerate(zip(tasks, self.results, strict=True)):
            task_rows, res.texts_cut = training_rows(spm, t.texts, t.name, config.max_length)
            res.scored_tokens, res.text_tokens = scored_tokens(task_rows)
            self.rows += [(ids, n_virtual, scored, i) for ids, n_virtual, scored in task_rows]
        self.steps_per_epoch = (len(self.rows) + self.global_batch - 1) // self.global_batch
        self.epochs = config.epochs
        """The epochs the run trains: ``config.epochs``, more while it extends (``extend``)."""
        self.total_steps = self.steps_per_epoch * self.epochs
        # the schedule spans the run's steps as they stand: an extended run's re-plans to its end
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(config.schedule, config.warmup, self.total_steps)(step),
        )
        self.judges: list[Judge | None] = [
            task_judge(spm, t.texts, t.eval_texts) if config.keep == "metric" else None
            for t in tasks
        ]
        if self.group.sharded and any(self.judges):
            raise UserError("--keep metric generates on the whole model: not with --shard")
        for res, judge in zip(self.results, self.judges, strict=True):
            res.kept_by = (
                judge.description
                if judge is not None
                else "the last rows"
                if config.keep == "last"
                else "held-out loss"
            )
        self.best = [rows.detach().clone() for rows in self.current_rows()]
        self.best_loss = [math.inf] * self.n_tasks
        self.since_best = [0] * self.n_tasks
        first_epoch, skip = 1, 0
        self.start = time.perf_counter()  # restarted below, after the first evaluation
        if state is not None:
            first_epoch, skip = self.restore(state)
        elif not trial:
            checksum = spm.base_checksum()
            for res in self.results:
                res.base_checksum_before = checksum
            self.held_out(0)
        self.start = time.perf_counter()
        return first_epoch, skip

    def train_step(self, batch: list[tuple[list[int], int, list[bool], int]], epoch: int) -> None:
        """One optimisation step on ``batch`` (this process's share of it), all tasks at once."""
        group, params, n_tasks = self.group, self.params, self.n_tasks
        began = time.perf_counter()
        mine = batch[group.rank :: group.world]
        self.install(grad=True)
        if mine:
            totals, counts = task_losses(self.spm, mine, n_tasks)
        elif group.sharded:  # every process runs the sharded layers: the first row, weighed 0
            totals, counts = task_losses(self.spm, batch[:1], n_tasks)
            totals, counts = totals * 0.0, counts * 0.0
        else:  # a last batch smaller than the processes: this one only joins the sums
            totals = torch.stack([p.sum().float() * 0.0 for p in params])
            counts = torch.zeros(n_tasks, device=totals.device)
        # Each task's summed loss and scored tokens over every process: each process divides
        # its sums by the whole batch's token counts, so summed gradients are the whole batch's.
        sums = dist_sum(group, torch.cat([totals.detach().float(), counts]))
        loss = (totals / sums[n_tasks:].clamp(min=1)).sum()
        host = sums.tolist()
        global_totals, global_counts = host[:n_tasks], host[n_tasks:]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for i, trained in enumerate(self.trained):
            for p in trained:
                if global_counts[i] == 0:
                    p.grad = None  # not in this batch anywhere: AdamW leaves it alone
                elif group.active:
                    if p.grad is None:  # in the batch, but only in other processes' shares
                        p.grad = torch.zeros_like(p)
                    dist_sum(group, p.grad)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.stepping += time.perf_counter() - began
        for i, res in enumerate(self.results):
            if global_counts[i] > 0:
                value = float(global_totals[i] / global_counts[i])
                res.samples += sum(1 for row in batch if row[3] == i)
                res.steps.append({"step": self.step, "epoch": epoch, "loss": value})

    def current_rows(self) -> list[torch.Tensor]:
        """Each task's rows as the model sees them now (a reparameterised task's computed)."""
        with torch.no_grad():
            return [
                p if m is None else m() for p, m in zip(self.params, self.reparams, strict=True)
            ]

    def install(self, grad: bool) -> None:
        """Put each reparameterised task's rows in the model: computed with their graph for a
        training step, without it for an evaluation (no-op without ``--reparam``)."""
        for t, m in zip(self.tasks, self.reparams, strict=True):
            if m is not None:
                with torch.set_grad_enabled(grad):
                    self.spm.set_rows(t.name, m())

    def held_out(self, epoch: int) -> None:
        """Evaluate every task on its held-out texts; keep each task's best rows (its latest
        under ``keep="last"``)."""
        self.install(grad=False)
        for i, (t, res) in enumerate(zip(self.tasks, self.results, strict=True)):
            ev = evaluate(
                self.spm,
                t.eval_texts,
                t.name,
                batch_size=self.config.eval_batch_size,
                max_length=self.config.max_length,
            )
            res.evals.append(
                {
                    "epoch": epoch,
                    "step": self.step,
                    "loss": ev.loss,
                    "tokens": ev.tokens,
                    "train_seconds": round(self.stepping, 3),
                }
            )
            improved = ev.loss < self.best_loss[i]
            if improved:
                self.best_loss[i], self.since_best[i] = ev.loss, 0
            else:
                self.since_best[i] += 1  # patience counts from the best loss either way
            judge = self.judges[i]
            if judge is not None:  # the task's metric decides, the loss breaks ties
                score = res.evals[-1]["metric"] = judge.score(self.spm, t.name, t.eval_texts)
                kept = [e for e in res.evals[:-1] if e["step"] == res.best_step]
                improved = not kept or (score, -ev.loss) > (kept[-1]["metric"], -kept[-1]["loss"])
            if improved or self.config.keep == "last":
                self.best[i] = self.current_rows()[i].detach().clone()
                res.best_step = self.step

    def improving(self) -> bool:
        """Whether the run, at the end of its epochs, trains one more: ``config.max_epochs`` not
        reached, and for some task one of the last ``EXTEND_PATIENCE`` evaluations is better than
        every one before them by at least ``EXTEND_MIN_GAIN``."""
        if self.epochs >= self.config.max_epochs:
            return False
        for res in self.results:
            losses = [e["loss"] for e in res.evals]
            recent, before = losses[-EXTEND_PATIENCE:], losses[:-EXTEND_PATIENCE]
            if before and min(recent) < min(before) - EXTEND_MIN_GAIN:
                return True
        return False

    def extend(self) -> None:
        """One epoch more (the learning-rate schedule re-planned to the new end)."""
        self.epochs += 1
        self.total_steps = self.steps_per_epoch * self.epochs

    def stalled(self) -> bool:
        """``config.patience`` evaluations without a better one, for every task."""
        return bool(self.config.patience) and min(self.since_best) >= self.config.patience

    def show(self, bar: Any, epoch: int, key: str) -> None:
        """The progress bar's figures: the last step's loss, or the held-out loss(es)."""
        results = self.results
        if self.n_tasks == 1:
            value = (
                results[0].evals[-1]["loss"] if key == "heldout" else results[0].steps[-1]["loss"]
            )
            bar.set_postfix({"epoch": epoch, key: f"{value:.3f}"})
        elif key == "heldout":
            bar.set_postfix(
                {"epoch": epoch, key: "/".join(f"{r.evals[-1]['loss']:.3f}" for r in results)}
            )
        else:
            bar.set_postfix(epoch=epoch)

    def save_checkpoint(self, epoch: int, done_in_epoch: int, rng: Any) -> None:
        """Everything needed to go on from here (rank 0 only; nothing without a folder)."""
        if self.checkpoints is None or not self.group.main:
            return
        self.checkpoint.save(
            self.checkpoints,
            {
                "fingerprint": self.fingerprint,
                "epochs": self.epochs,
                **({"record": self.record} if self.record is not None else {}),
                "rows": [p.detach().float().cpu() for p in self.params],
                "reparams": [
                    None if m is None else {k: v.cpu() for k, v in m.state_dict().items()}
                    for m in self.reparams
                ],
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "epoch": epoch,
                "done_in_epoch": done_in_epoch,
                "epoch_rng": _rng_to_lists(rng),
                "torch_rng": torch.get_rng_state(),
                "best": [b.float().cpu() for b in self.best],
                "best_loss": self.best_loss,
                "since_best": self.since_best,
                "stepping": self.stepping,
                "results": [
                    {
                        "steps": res.steps,
                        "evals": res.evals,
                        "seconds": res.seconds + time.perf_counter() - self.start,
                        "samples": res.samples,
                        "best_step": res.best_step,
                        "base_checksum_before": res.base_checksum_before,
                    }
                    for res in self.results
                ],
            },
        )

    def restore(self, state: dict[str, Any]) -> tuple[int, int]:
        """Take up a checkpoint's state; returns its epoch and the batches done in it."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.epoch_rng = _rng_from_lists(state["epoch_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.best = [b.to(p) for b, p in zip(state["best"], self.params, strict=True)]
        self.best_loss = [float(v) for v in state["best_loss"]]
        self.since_best = [int(v) for v in state["since_best"]]
        self.stepping = float(state["stepping"])
        self.epochs = int(state.get("epochs", self.epochs))  # more, resumed in an extension
        self.total_steps = self.steps_per_epoch * self.epochs
        for res, saved in zip(self.results, state["results"], strict=True):
            res.steps, res.evals = list(saved["steps"]), list(saved["evals"])
            res.seconds, res.samples = float(saved["seconds"]), int(saved["samples"])
            res.best_step = int(saved["best_step"])
            res.base_checksum_before = saved["base_checksum_before"]
            res.resumed_from = self.step
        return int(state["epoch"]), int(state["done_in_epoch"])

    def finish(self) -> list[TrainResult]:
        """Leave each task's best rows in the model, frozen; close the results' clocks."""
        elapsed = time.perf_counter() - self.start
        checksum = self.spm.base_checksum()
        with torch.no_grad():
            for t, p, m, b in zip(self.tasks, self.params, self.reparams, self.best, strict=True):
                p.copy_(b)  # a reparameterised task's rows, folded: plain rows from here on
                p.requires_grad_(False)
                if m is not None:
                    self.spm.set_rows(t.name, p)
        for res in self.results:
            res.seconds += elapsed
            res.base_checksum_after = checksum
            res.config = self.config
        return self.results


def task_losses(
    spm: SoftPromptModel, rows: list[tuple[list[int], int, list[bool], int]], n_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy per task over ``rows`` (``(ids, n_virtual, scored, task)``) in one
    forward,
    and each task's scored token count (float, on the same device)."""
    if n_tasks == 1:
        total, count = batch_loss(spm, [(i, n, s) for i, n, s, _ in rows], skip_first=False)
        return total.reshape(1), total.new_tensor([float(count)])
    per_row, counts = batch_loss(
        spm, [(i, n, s) for i, n, s, _ in rows], skip_first=False, per_row=True
    )
    task = per_row.new_tensor([t for *_, t in rows], dtype=torch.long)
    totals = per_row.new_zeros(n_tasks).index_add(0, task, per_row)
    token_counts = per_row.new_zeros(n_tasks).index_add(0, task, per_row.new_tensor(counts))
    return totals, token_counts


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning rate's multiplier at each step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _rng_to_lists(state: Any) -> list[Any]:
    """``random.Random.getstate()`` as lists (what ``torch.load(weights_only=True)`` reads)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_lists(saved: list[Any]) -> Any:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


RowT = TypeVar("RowT", bound=tuple[Any, ...])


def epoch_batches(
    rows: list[RowT], batch_size: int, rng: random.Random, group_by_length: bool
) -> list[list[RowT]]:
    """One epoch's batches: ``length_grouped_batches``, or plain shuffled ones."""
    if group_by_length:
        return length_grouped_batches(rows, batch_size, rng)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    return [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]


def length_grouped_batches(
    rows: list[RowT], batch_size: int, rng: random.Random
) -> list[list[RowT]]:
    """Shuffled batches of rows of similar length: less padding, so less wasted compute.

    Rows are shuffled, cut into windows of 8 batches, sorted by length inside each window, and the
    resulting batches shuffled again, so every epoch still sees a different order.
    """
    shuffled = rows[:]
    rng.shuffle(shuffled)
    window = batch_size * 8
    batches = []
    for start in range(0, len(shuffled), window):
        chunk = sorted(shuffled[start : start + window], key=lambda r: len(r[0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
