"""Training a soft prompt: only its rows get gradients; the base model stays frozen.

``train(spm, name, texts, eval_texts, config)`` is one plain loop (AdamW on the prompt rows,
cross-entropy on the text tokens); ``save_trained`` writes the PEFT files and everything beside
them into a staging folder and puts it in place (see ``files``), so a failed save leaves nothing
half-written; if the output cannot be written after training, the trained prompt is rescued to
a folder the error names, never thrown away.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .evaluate import batch_loss, evaluate, training_rows
from .files import check_output, put_in_place, staging_dir
from .prompt import Adapter, SoftPromptModel, adapter_config, write_adapter_files

INITS = ("vocab", "text", "random", "file")
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

    @property
    def loss_before(self) -> float:
        return self.evals[0]["loss"]

    @property
    def loss_after(self) -> float:
        return self.evals[-1]["loss"]


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
) -> TrainResult:
    """Add adapter ``name`` with rows ``initial`` to ``spm`` and train it on ``texts``.

    Returns the measured curves; the trained rows stay loaded in ``spm`` under ``name``.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    if config.compile:
        spm.compile()
    param = spm.add_adapter(Adapter(name=name, weights=initial), trainable=True)
    base_params = sum(p.numel() for p in spm.model.parameters())
    result = TrainResult(
        name=name, trainable_params=param.numel(), total_params=base_params + param.numel()
    )
    optimizer = torch.optim.AdamW([param], lr=config.lr, weight_decay=0.0)
    rows, result.texts_cut = training_rows(spm, texts, name, config.max_length)
    order = random.Random(config.seed)
    steps_per_epoch = (len(rows) + config.batch_size - 1) // config.batch_size

    def held_out(epoch: int) -> None:
        res = evaluate(
            spm, eval_texts, name, batch_size=config.eval_batch_size, max_length=config.max_length
        )
        result.evals.append({"epoch": epoch, "loss": res.loss, "tokens": res.tokens})

    result.base_checksum_before = spm.base_checksum()
    held_out(0)
    start = time.perf_counter()
    bar = tqdm(
        total=steps_per_epoch * config.epochs,
        desc=f"training {name}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    step = 0
    for epoch in range(1, config.epochs + 1):
        for batch in length_grouped_batches(rows, config.batch_size, order):
            total, count = batch_loss(spm, batch, skip_first=False)
            loss = total / max(count, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            result.samples += len(batch)
            value = float(loss.detach())
            result.steps.append({"step": step, "epoch": epoch, "loss": value})
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{value:.3f}")
        held_out(epoch)
        bar.set_postfix(epoch=epoch, heldout=f"{result.evals[-1]['loss']:.3f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    param.requires_grad_(False)
    result.base_checksum_after = spm.base_checksum()
    return result


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
