"""Training a soft prompt: only its rows get gradients; the base model stays frozen.

``train(spm, name, texts, eval_texts, config)`` is one plain loop (AdamW on the prompt rows,
cross-entropy on the text tokens); ``save_trained`` writes the PEFT files and everything beside
them into a staging folder and puts it in place (see ``files``), so a failed save leaves nothing
half-written; if the output cannot be written after training, the trained prompt is rescued to
a folder the error names, never thrown away.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .data import Example, as_example
from .distributed import SINGLE, Group
from .distributed import sum_ as dist_sum
from .errors import UserError
from .evaluate import batch_loss, evaluate, scored_tokens, training_rows
from .files import check_output, put_in_place, staging_dir
from .prefix import METHODS
from .prompt import Adapter, SoftPromptModel, adapter_config, write_adapter_files

INITS = ("vocab", "text", "labels", "random", "file")
SCHEDULES = ("constant", "linear", "cosine")
HELDOUT_FILE = "heldout.jsonl"
"""Held-out texts split off the training data, kept beside the adapter they evaluated."""


@dataclass
class TrainConfig:
    """How to train one soft prompt. Defaults give a clear held-out gain on the embedded model."""

    virtual_tokens: int = 8
    """Number of virtual tokens (rows of the prompt)."""
    method: str = "prompt"
    """prompt (prompt tuning: input rows) or prefix (prefix tuning: keys/values at every layer)."""
    init: str = "vocab"
    """vocab (random vocabulary rows), text (rows of --init-text), random (scale-matched), file."""
    init_text: str | None = None
    init_from: str | None = None
    """Adapter folder whose rows start training (init file)."""
    epochs: int = 5
    lr: float = 3e-2
    batch_size: int = 8
    max_length: int = 64
    """Text tokens per example, EOS included. A text that does not fit is cut and gets no EOS."""
    seed: int = 0
    heldout_fraction: float = 0.1
    """Share of the data held out for evaluation when no eval data is given."""
    eval_batch_size: int = 16
    compile: bool = False
    """Run the model through ``torch.compile`` (``SoftPromptModel.compile``)."""
    warmup: int = 0
    """Steps over which the learning rate rises linearly from 0 to ``lr``."""
    schedule: str = "constant"
    """After the warm-up: constant, linear (to 0 at the last step) or cosine (to 0)."""
    eval_every: int = 0
    """Held-out evaluation every this many steps; 0: at each epoch's end."""
    patience: int = 0
    """Stop after this many evaluations without a better held-out loss; 0: never."""
    checkpoint_every: int = 100
    """Steps between checkpoints (also written at each epoch's end); 0: only at epochs' ends."""

    def __post_init__(self) -> None:
        if self.virtual_tokens < 1:
            raise UserError("--virtual-tokens must be at least 1")
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}")
        if self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}")
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise UserError("--init text needs --init-text")
        if self.init == "file" and not self.init_from:
            raise UserError("--init file needs --init-from ADAPTER")
        if self.epochs < 1:
            raise UserError("--epochs must be at least 1")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be from 0 to {2**63 - 1}")
        if not self.lr > 0:
            raise UserError("--lr must be positive")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.max_length < 2:
            raise UserError("--max-length must be at least 2")
        if not 0 < self.heldout_fraction < 1:
            raise UserError("the held-out fraction must be between 0 and 1")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        for flag, value in (
            ("--warmup", self.warmup),
            ("--eval-every", self.eval_every),
            ("--patience", self.patience),
            ("--checkpoint-every", self.checkpoint_every),
        ):
            if value < 0:
                raise UserError(f"{flag} must be 0 or more")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        same = asdict(self)
        for free in ("compile", "checkpoint_every", "eval_batch_size", "init_from", "init_text"):
            same.pop(free)
        return same


@dataclass
class TrainResult:
    """What training measured: per-step train loss, held-out loss per epoch (epoch 0 = before)."""

    name: str
    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0
    texts_cut: int = 0
    """Training texts longer than ``max_length``, cut (so trained without an EOS)."""
    scored_tokens: int = 0
    """Text tokens of the training examples that the loss covers (completions, assistant
    turns; every token of plain texts)."""
    text_tokens: int = 0
    """All text tokens of the training examples."""
    trainable_params: int = 0
    total_params: int = 0
    base_checksum_before: str = ""
    """SHA-256 of the base weights before and after training: equal, or training is broken."""
    base_checksum_after: str = ""
    best_step: int = 0
    """Step of the best held-out loss: the rows kept and saved are that step's."""
    stopped_early: bool = False
    resumed_from: int | None = None
    """Step the run was resumed from (None: it ran from the start)."""

    @property
    def loss_before(self) -> float:
        return self.evals[0]["loss"]

    @property
    def loss_after(self) -> float:
        """Held-out loss of the kept rows (the best evaluation's)."""
        return min(e["loss"] for e in self.evals)


def trainable_summary(trainable: int, total: int) -> str:
    """The line PEFT's ``print_trainable_parameters`` prints."""
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


@dataclass
class Task:
    """One prompt to train: its adapter name, starting rows, training and held-out texts."""

    name: str
    initial: torch.Tensor
    texts: Sequence[str | Example]
    eval_texts: Sequence[str | Example]


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

    Returns:
        One result per task, in order; each task's adapter is left in ``spm`` with its best rows.

    Raises:
        UserError: ``resume`` without a usable checkpoint (see ``checkpoint.load``).
    """
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt

    names = [t.name for t in tasks]
    fingerprint: dict[str, Any] = {
        "config": config.fingerprint(),
        "tasks": names,
        "data": ckpt.texts_digest(*(group for t in tasks for group in (t.texts, t.eval_texts))),
        "model": spm.base.name,
        "hidden_size": spm.hidden_size,
        "vocab_size": spm.vocab_size,
        "virtual_tokens": [int(t.initial.shape[0]) for t in tasks],
        "processes": group.world,
        # What changes the arithmetic: a resumed run on another dtype or device is another run.
        "dtype": str(spm.embedding.weight.dtype).removeprefix("torch."),
        "device": spm.device.type,
    }
    state = ckpt.load(checkpoints, fingerprint) if resume and checkpoints is not None else None
    torch.manual_seed(config.seed)
    if config.compile:
        spm.compile()
    params = [
        spm.add_adapter(
            Adapter(
                name=t.name,
                weights=state["rows"][i] if state is not None else t.initial,
                config=_method_config(spm, config, int(t.initial.shape[0])),
            ),
            trainable=True,
        )
        for i, t in enumerate(tasks)
    ]
    base_params = sum(p.numel() for p in spm.model.parameters())
    results = [
        TrainResult(name=t.name, trainable_params=p.numel(), total_params=base_params + p.numel())
        for t, p in zip(tasks, params, strict=True)
    ]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rows: list[tuple[list[int], int, list[bool], int]] = []  # (ids, n_virtual, scored, task)
    for i, (t, res) in enumerate(zip(tasks, results, strict=True)):
        task_rows, res.texts_cut = training_rows(spm, t.texts, t.name, config.max_length)
        res.scored_tokens, res.text_tokens = scored_tokens(task_rows)
        rows += [(ids, n_virtual, scored, i) for ids, n_virtual, scored in task_rows]
    global_batch = config.batch_size * group.world
    steps_per_epoch = (len(rows) + global_batch - 1) // global_batch
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, config.warmup, total_steps)
    )
    order = random.Random(config.seed)
    n_tasks = len(tasks)
    best = [p.detach().clone() for p in params]
    best_loss = [math.inf] * n_tasks
    since_best = [0] * n_tasks
    step, first_epoch, skip = 0, 1, 0
    epoch_rng = order.getstate()
    stepping = 0.0  # seconds spent in training steps (evaluations and checkpoints left out)

    def held_out(epoch: int) -> None:
        for i, (t, res) in enumerate(zip(tasks, results, strict=True)):
            ev = evaluate(
                spm,
                t.eval_texts,
                t.name,
                batch_size=config.eval_batch_size,
                max_length=config.max_length,
            )
            res.evals.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "loss": ev.loss,
                    "tokens": ev.tokens,
                    "train_seconds": round(stepping, 3),
                }
            )
            if ev.loss < best_loss[i]:
                best[i], best_loss[i], since_best[i] = params[i].detach().clone(), ev.loss, 0
                res.best_step = step
            else:
                since_best[i] += 1

    def show(epoch: int, key: str) -> None:
        if n_tasks == 1:
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

    def stalled() -> bool:
        return bool(config.patience) and min(since_best) >= config.patience

    def save_checkpoint(epoch: int, done_in_epoch: int, rng: Any) -> None:
        if checkpoints is None or not group.main:
            return
        ckpt.save(
            checkpoints,
            {
                "fingerprint": fingerprint,
                "rows": [p.detach().float().cpu() for p in params],
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "done_in_epoch": done_in_epoch,
                "epoch_rng": _rng_to_lists(rng),
                "torch_rng": torch.get_rng_state(),
                "best": [b.float().cpu() for b in best],
                "best_loss": best_loss,
                "since_best": since_best,
                "stepping": stepping,
                "results": [
                    {
                        "steps": res.steps,
                        "evals": res.evals,
                        "seconds": res.seconds + time.perf_counter() - start,
                        "samples": res.samples,
                        "best_step": res.best_step,
                        "base_checksum_before": res.base_checksum_before,
                    }
                    for res in results
                ],
            },
        )

    start = time.perf_counter()  # the checkpoints' clock; restarted below, after held_out(0)
    if state is None:
        checksum = spm.base_checksum()
        for res in results:
            res.base_checksum_before = checksum
        held_out(0)
    else:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, first_epoch, skip = state["step"], state["epoch"], state["done_in_epoch"]
        epoch_rng = _rng_from_lists(state["epoch_rng"])
        torch.set_rng_state(state["torch_rng"])
        best = [b.to(p) for b, p in zip(state["best"], params, strict=True)]
        best_loss = [float(v) for v in state["best_loss"]]
        since_best = [int(v) for v in state["since_best"]]
        stepping = float(state["stepping"])
        for res, saved in zip(results, state["results"], strict=True):
            res.steps, res.evals = list(saved["steps"]), list(saved["evals"])
            res.seconds, res.samples = float(saved["seconds"]), int(saved["samples"])
            res.best_step = int(saved["best_step"])
            res.base_checksum_before = saved["base_checksum_before"]
            res.resumed_from = step
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"training {'+'.join(names)}",
        unit="step",
        disable=not (progress and group.main),
        dynamic_ncols=True,
    )
    stop = False
    for epoch in range(first_epoch, config.epochs + 1):
        if epoch != first_epoch or state is None:
            epoch_rng = order.getstate()
        else:
            order.setstate(epoch_rng)
        batches = length_grouped_batches(rows, global_batch, order)
        for index, batch in enumerate(batches):
            if epoch == first_epoch and index < skip:
                continue
            began = time.perf_counter()
            mine = batch[group.rank :: group.world]
            if mine:
                totals, counts = task_losses(spm, mine, n_tasks)
            else:  # a last batch smaller than the processes: this one only joins the sums
                totals = torch.stack([p.sum().float() * 0.0 for p in params])
                counts = torch.zeros(n_tasks, device=totals.device)
            # Each task's summed loss and scored tokens over every process: each process
            # divides its sums by the whole batch's token counts, so summed gradients are the
            # whole batch's.
            sums = dist_sum(group, torch.cat([totals.detach().float(), counts]))
            loss = (totals / sums[n_tasks:].clamp(min=1)).sum()
            host = sums.tolist()
            global_totals, global_counts = host[:n_tasks], host[n_tasks:]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for i, p in enumerate(params):
                if global_counts[i] == 0:
                    p.grad = None  # not in this batch anywhere: AdamW leaves it alone
                elif group.active:
                    if p.grad is None:  # in the batch, but only in other processes' shares
                        p.grad = torch.zeros_like(p)
                    dist_sum(group, p.grad)
            optimizer.step()
            scheduler.step()
            step += 1
            stepping += time.perf_counter() - began
            for i, res in enumerate(results):
                if global_counts[i] > 0:
                    value = float(global_totals[i] / global_counts[i])
                    res.samples += sum(1 for row in batch if row[3] == i)
                    res.steps.append({"step": step, "epoch": epoch, "loss": value})
            bar.update(1)
            show(epoch, "loss")
            if config.eval_every and step % config.eval_every == 0:
                held_out(epoch)
                show(epoch, "heldout")
                stop = stalled()
            if stop:
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(epoch, index + 1, epoch_rng)
        if not config.eval_every and not stop:
            held_out(epoch)
            show(epoch, "heldout")
            stop = stalled()
        if stop:
            for res in results:
                res.stopped_early = True
            break
        save_checkpoint(epoch + 1, 0, order.getstate())
    bar.close()
    elapsed = time.perf_counter() - start
    checksum = spm.base_checksum()
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
            p.requires_grad_(False)
    for res in results:
        res.seconds += elapsed
        res.base_checksum_after = checksum
    return results


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


def _method_config(spm: SoftPromptModel, config: TrainConfig, n: int) -> dict[str, Any]:
    """The PEFT config an adapter of ``config.method`` carries (empty for prompt tuning, whose
    file config is written at save time)."""
    if config.method == "prompt":
        return {}
    from .prefix import peft_config

    return peft_config(n, spm.prefix_shape, spm.base.name)


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


def save_trained(
    spm: SoftPromptModel,
    name: str,
    output: str | Path,
    config: TrainConfig,
    result: TrainResult,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    heldout: Sequence[str | Example] | None = None,
) -> Path:
    """Write adapter ``name`` to ``output``: PEFT files, config, loss log, plot and model card.

    Everything is written into a staging sibling folder first, then put in place atomically
    (``files.put_in_place``). Whatever goes wrong, the trained rows are not lost: they are
    rescued to a folder (``rescue``) that the error names.

    Raises:
        UserError: ``output`` exists and is not empty (unless ``overwrite``), or cannot be written
            (an ``OSError`` such as a full disk or a refused permission); the message says where
            the trained prompt was rescued to.
    """
    weights, peft_config, loss_log = _adapter_parts(spm, name, config, result)
    tmp: Path | None = None
    target = Path(output)
    try:
        target = check_output(output, overwrite)
        tmp = staging_dir(target)
        write_adapter_files(tmp, weights, peft_config)
        (tmp / "training_config.json").write_text(
            json.dumps({**asdict(config), **(extra or {}), "base_model": spm.base.name}, indent=2)
            + "\n"
        )
        (tmp / "loss_log.json").write_text(json.dumps(loss_log, indent=2) + "\n")
        from .plots import plot_losses
        from .report import write_model_card

        plot_losses(result, tmp / "loss.png")
        write_model_card(tmp / "README.md", name, spm.base.name, config, result, extra or {})
        if heldout is not None:
            (tmp / HELDOUT_FILE).write_text(
                "".join(json.dumps(as_example(t).as_json()) + "\n" for t in heldout)
            )
        tmp.chmod(0o755)
        put_in_place(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        rescued = rescue(name, weights, peft_config, loss_log)
        if isinstance(exc, OSError | UserError):
            where = (
                f"the trained prompt was saved to {rescued} instead; move it into place with "
                f"`mv {rescued} {target}`"
                if rescued
                else "and it could not be saved anywhere else either"
            )
            why = (
                exc
                if isinstance(exc, UserError)
                else f"cannot save {target}: {exc.strerror or exc}"
            )
            raise UserError(f"{why}; {where}") from exc
        if rescued:
            print(f"softprompt: the trained prompt was saved to {rescued}", file=sys.stderr)
        raise
    return target


def _adapter_parts(
    spm: SoftPromptModel, name: str, config: TrainConfig, result: TrainResult
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """A trained adapter's rows, its PEFT config and its loss log."""
    weights = spm.adapter_weights(name)
    adapter = Adapter(name=name, weights=weights)
    peft_config = (
        adapter_config(adapter, spm.base.name, init=config.init, init_text=config.init_text)
        if config.method == "prompt"
        else _method_config(spm, config, adapter.num_virtual_tokens)
    )
    loss_log = {
        "steps": result.steps,
        "evals": result.evals,
        "seconds": result.seconds,
        "samples": result.samples,
        "texts_cut": result.texts_cut,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "base_checksum_before": result.base_checksum_before,
        "base_checksum_after": result.base_checksum_after,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from,
    }
    return weights, peft_config, loss_log


def rescue_trained(
    spm: SoftPromptModel, name: str, config: TrainConfig, result: TrainResult
) -> Path | None:
    """Keep a trained adapter that a check after training refuses to save (see ``rescue``)."""
    return rescue(name, *_adapter_parts(spm, name, config, result))


def rescue(
    name: str, weights: torch.Tensor, peft_config: dict[str, Any], loss_log: dict[str, Any]
) -> Path | None:
    """Save a trained prompt that could not go where asked; returns where it went, or None.

    Tries a ``rescued/`` folder in softprompt's cache, then the system's temporary folder.
    """
    from .models import cache_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for root in (cache_dir() / "rescued", Path(tempfile.gettempdir()) / "softprompt-rescued"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"{name}-{stamp}-", dir=root))
            write_adapter_files(folder, weights, peft_config)
            (folder / "loss_log.json").write_text(json.dumps(loss_log, indent=2) + "\n")
            folder.chmod(0o755)
            return folder
        except OSError:
            continue
    return None
