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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import SINGLE, Group
from .distributed import sum_ as dist_sum
from .errors import UserError
from .evaluate import batch_loss, evaluate, training_rows
from .files import check_output, put_in_place, staging_dir
from .prompt import Adapter, SoftPromptModel, adapter_config, write_adapter_files

INITS = ("vocab", "text", "random", "file")
SCHEDULES = ("constant", "linear", "cosine")
HELDOUT_FILE = "heldout.jsonl"
"""Held-out texts split off the training data, kept beside the adapter they evaluated."""


@dataclass
class TrainConfig:
    """How to train one soft prompt. Defaults give a clear held-out gain on the embedded model."""

    virtual_tokens: int = 8
    """Number of virtual tokens (rows of the prompt)."""
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
        if self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}")
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise UserError("--init text needs --init-text")
        if self.init == "file" and not self.init_from:
            raise UserError("--init file needs --init-from ADAPTER")
        if self.epochs < 1:
            raise UserError("--epochs must be at least 1")
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


def train(
    spm: SoftPromptModel,
    name: str,
    initial: torch.Tensor,
    texts: list[str],
    eval_texts: list[str],
    config: TrainConfig,
    progress: bool = True,
    checkpoints: Path | None = None,
    resume: bool = False,
    group: Group = SINGLE,
) -> TrainResult:
    """Add adapter ``name`` with rows ``initial`` to ``spm`` and train it on ``texts``.

    The rows kept at the end (loaded in ``spm`` under ``name``) are those of the best held-out
    evaluation (the loss log's ``best_step``), which may be the starting rows themselves.

    Args:
        checkpoints: folder for this run's checkpoint (``checkpoint.checkpoint_dir``); None
            writes none.
        resume: continue from the checkpoint there (same settings, data and model).
        group: the data-parallel process group (``distributed``): each process trains on its
            share of every batch of ``batch_size`` x processes rows; only rank 0 writes.

    Raises:
        UserError: ``resume`` without a usable checkpoint (see ``checkpoint.load``).
    """
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt

    fingerprint = {
        "config": config.fingerprint(),
        "data": ckpt.texts_digest(texts, eval_texts),
        "model": spm.base.name,
        "hidden_size": spm.hidden_size,
        "vocab_size": spm.vocab_size,
        "virtual_tokens": int(initial.shape[0]),
        "processes": group.world,
    }
    state = ckpt.load(checkpoints, fingerprint) if resume and checkpoints is not None else None
    torch.manual_seed(config.seed)
    if config.compile:
        spm.compile()
    start_rows = state["rows"] if state is not None else initial
    param = spm.add_adapter(Adapter(name=name, weights=start_rows), trainable=True)
    base_params = sum(p.numel() for p in spm.model.parameters())
    result = TrainResult(
        name=name, trainable_params=param.numel(), total_params=base_params + param.numel()
    )
    optimizer = torch.optim.AdamW([param], lr=config.lr, weight_decay=0.0)
    rows, result.texts_cut = training_rows(spm, texts, name, config.max_length)
    global_batch = config.batch_size * group.world
    steps_per_epoch = (len(rows) + global_batch - 1) // global_batch
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, config.warmup, total_steps)
    )
    order = random.Random(config.seed)
    best = param.detach().clone()
    best_loss = math.inf
    since_best = 0
    step, first_epoch, skip = 0, 1, 0
    epoch_rng = order.getstate()

    def held_out(epoch: int) -> None:
        nonlocal best, best_loss, since_best
        res = evaluate(
            spm, eval_texts, name, batch_size=config.eval_batch_size, max_length=config.max_length
        )
        result.evals.append({"epoch": epoch, "step": step, "loss": res.loss, "tokens": res.tokens})
        if res.loss < best_loss:
            best, best_loss, since_best = param.detach().clone(), res.loss, 0
            result.best_step = step
        else:
            since_best += 1

    def save_checkpoint(epoch: int, done_in_epoch: int, rng: Any) -> None:
        if checkpoints is None or not group.main:
            return
        ckpt.save(
            checkpoints,
            {
                "fingerprint": fingerprint,
                "rows": param.detach().float().cpu(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "done_in_epoch": done_in_epoch,
                "epoch_rng": _rng_to_lists(rng),
                "torch_rng": torch.get_rng_state(),
                "best": best.float().cpu(),
                "best_loss": best_loss,
                "since_best": since_best,
                "result": {
                    "steps": result.steps,
                    "evals": result.evals,
                    "seconds": result.seconds + time.perf_counter() - start,
                    "samples": result.samples,
                    "best_step": result.best_step,
                    "base_checksum_before": result.base_checksum_before,
                },
            },
        )

    start = time.perf_counter()  # the checkpoints' clock; restarted below, after held_out(0)
    if state is None:
        result.base_checksum_before = spm.base_checksum()
        held_out(0)
    else:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, first_epoch, skip = state["step"], state["epoch"], state["done_in_epoch"]
        epoch_rng = _rng_from_lists(state["epoch_rng"])
        torch.set_rng_state(state["torch_rng"])
        best = state["best"].to(param)
        best_loss, since_best = float(state["best_loss"]), int(state["since_best"])
        saved = state["result"]
        result.steps, result.evals = list(saved["steps"]), list(saved["evals"])
        result.seconds, result.samples = float(saved["seconds"]), int(saved["samples"])
        result.best_step = int(saved["best_step"])
        result.base_checksum_before = saved["base_checksum_before"]
        result.resumed_from = step
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"training {name}",
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
            mine = batch[group.rank :: group.world]
            if mine:
                total, count = batch_loss(spm, mine, skip_first=False)
            else:  # a last batch smaller than the processes: this one only joins the sums
                total, count = param.sum() * 0.0, 0
            # The batch's scored tokens and loss over every process: each divides its summed
            # loss by the whole batch's token count, so summed gradients are the whole batch's.
            sums = dist_sum(group, torch.stack([total.detach().float(), total.new_tensor(count)]))
            loss = total / sums[1].clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if group.active and param.grad is not None:
                dist_sum(group, param.grad)
            optimizer.step()
            scheduler.step()
            step += 1
            result.samples += len(batch)
            value = float(sums[0] / sums[1].clamp(min=1))
            result.steps.append({"step": step, "epoch": epoch, "loss": value})
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{value:.3f}")
            if config.eval_every and step % config.eval_every == 0:
                held_out(epoch)
                bar.set_postfix(epoch=epoch, heldout=f"{result.evals[-1]['loss']:.3f}")
                stop = bool(config.patience) and since_best >= config.patience
            if stop:
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(epoch, index + 1, epoch_rng)
        if not config.eval_every and not stop:
            held_out(epoch)
            bar.set_postfix(epoch=epoch, heldout=f"{result.evals[-1]['loss']:.3f}")
            stop = bool(config.patience) and since_best >= config.patience
        if stop:
            result.stopped_early = True
            break
        save_checkpoint(epoch + 1, 0, order.getstate())
    bar.close()
    result.seconds += time.perf_counter() - start
    with torch.no_grad():
        param.copy_(best)
    param.requires_grad_(False)
    result.base_checksum_after = spm.base_checksum()
    return result


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


def length_grouped_batches(
    rows: list[tuple[list[int], int]], batch_size: int, rng: random.Random
) -> list[list[tuple[list[int], int]]]:
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
    heldout: list[str] | None = None,
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
    weights = spm.adapter_weights(name)
    adapter = Adapter(name=name, weights=weights)
    peft_config = adapter_config(
        adapter, spm.base.name, init=config.init, init_text=config.init_text
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
                "".join(json.dumps({"text": t}) + "\n" for t in heldout)
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
