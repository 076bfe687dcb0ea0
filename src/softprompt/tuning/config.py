"""What a training run is asked to do (``TrainConfig``, ``Task``) and what it reports
(``TrainResult``): the bookkeeping, apart from the loop in ``train``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..data import Example
from ..errors import UserError
from ..prefix import METHODS
from .reparam import REPARAMS

if TYPE_CHECKING:
    import torch

TASK_WEIGHT_DECAY = 0.01
"""The weight decay of prompt tuning on prompt/completion or chat data, whose batches are then
plain shuffled ones (not grouped by length); measured in docs/benchmarks/tasks.md."""
DEFAULT_EPOCHS = 5
"""Epochs of a run when ``--epochs`` is not given (on small task data, more: ``MIN_TASK_STEPS``)."""
MIN_TASK_STEPS = 200
"""Fewest optimisation steps of a run on prompt/completion or chat data when ``--epochs`` is not
given: a small set gets as many epochs more as make these (120 rows at batch 8: 15 epochs, not
5). Five epochs of a small set left prompts under-trained on generated tasks, their held-out
loss still falling (docs/benchmarks/tasks.md, "How long a run trains")."""
EXTEND_PATIENCE = 2
"""Past its planned epochs a run trains on, epoch by epoch, while one of its last this many
held-out evaluations was its best by at least ``EXTEND_MIN_GAIN`` (up to ``max_epochs``)."""
EXTEND_MIN_GAIN = 1e-3
"""Nats per token: a smaller fall of the held-out loss does not extend a run. Set before any
result, as a tolerance, not a fit: it stops runs whose loss is already near zero (a
classification at 0.0003 going to 0.0002) from training on for nothing."""
DEFAULT_MAX_LENGTH = 64
"""Text tokens per example when neither the user nor the data (through the model) says more."""
INITS = ("vocab", "text", "labels", "random", "file")


SCHEDULES = ("constant", "linear", "cosine")
KEEPS = ("best", "last", "metric")


TASK_METHOD = "prefix"
"""The method of a run on prompt/completion or chat data when none is asked for: chosen on the
task suite's mean and worst seed (docs/benchmarks/tasks.md)."""
TASK_PREFIX_LR = 3e-2
"""The learning rate of prefix tuning on prompt/completion or chat data when none is asked for:
chosen on the task suite over 1e-2, 3e-3 and 1e-1 (docs/benchmarks/tasks.md). Prefix tuning on
plain text keeps 1e-2, which the suite cannot decide."""
TASK_REPARAM = "residual"
"""The reparameterisation of prompt tuning on prompt/completion or chat data when none is asked
for: chosen on the task suite (docs/benchmarks/tasks.md)."""


def is_task_data(formats: Sequence[str]) -> bool:
    """Whether a run's data (one format per task) is prompt/completion or chat throughout: the
    data the task defaults (``TASK_METHOD``, ``TASK_PREFIX_LR``, ``TASK_REPARAM``,
    ``TASK_WEIGHT_DECAY``) are for."""
    return bool(formats) and all(f != "text" for f in formats)


HELDOUT_FILE = "heldout.jsonl"
"""Held-out texts split off the training data, kept beside the adapter they evaluated."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train one soft prompt: the settings asked for. A field left at None is decided by
    ``resolve`` from the run's data (``softprompt train`` and ``train()`` both resolve, so the
    same data gets the same settings either way); the loop runs on the resolved ``RunConfig``.
    """

    virtual_tokens: int = 8
    """Number of virtual tokens (rows of the prompt); an ``init_from`` adapter's own count wins."""
    method: str | None = None
    """prompt (prompt tuning: input rows) or prefix (prefix tuning: keys/values at every layer).
    None: an ``init_from`` adapter's own method; else prompt with ``reparam`` residual; else
    ``TASK_METHOD`` for prompt/completion or chat data and prompt for plain text."""
    init: str | None = None
    """vocab (random vocabulary rows), text (rows of --init-text), labels, random
    (scale-matched), file. None: file with ``init_from``, else vocab."""
    init_text: str | None = None
    init_from: str | None = None
    """Adapter folder whose rows start training (init file)."""
    epochs: int | None = None
    """None: ``DEFAULT_EPOCHS``, or on prompt/completion or chat data as many as make at least
    ``MIN_TASK_STEPS`` steps, when more."""
    max_epochs: int | None = None
    """Past ``epochs`` the run trains on, epoch by epoch, while one of its last
    ``EXTEND_PATIENCE`` held-out evaluations was its best, up to this many epochs in all. None:
    twice the epochs the data decides when ``epochs`` is not given on prompt/completion or chat
    data; else ``epochs`` (no more)."""
    lr: float | None = None
    """None: 3e-2 for prompt tuning; for prefix tuning ``TASK_PREFIX_LR`` on prompt/completion
    or chat data, 1e-2 on plain text."""
    weight_decay: float | None = None
    """AdamW's decoupled weight decay on the prompt rows. None: ``TASK_WEIGHT_DECAY`` for prompt
    tuning on prompt/completion or chat data, else 0."""
    batch_size: int = 8
    max_length: int | None = None
    """Text tokens per example, EOS included; a text that does not fit is cut and gets no EOS.
    None: what the longest training example needs on the model (``rows.fitting_length``)."""
    seed: int = 0
    heldout_fraction: float = 0.1
    """Share of the data held out for evaluation (and the choice of the rows kept) when no eval
    data is given."""
    eval_batch_size: int = 16
    compile: bool = False
    """Run the model through ``torch.compile`` (``SoftPromptModel.compile``)."""
    warmup: int = 0
    """Steps over which the learning rate rises linearly from 0 to ``lr``."""
    schedule: str = "constant"
    """After the warm-up: constant, linear (to 0 at the last step) or cosine (to 0)."""
    group_by_length: bool | None = None
    """Batch rows of similar length together (less padding); False: plain shuffled batches.
    None: False for prompt tuning on prompt/completion or chat data, else True."""
    eval_every: int = 0
    """Held-out evaluation every this many steps; 0: at each epoch's end."""
    patience: int = 0
    """Stop after this many evaluations without a better held-out loss; 0: never."""
    keep: str = "best"
    """Which rows are saved: best (those of the best held-out loss), last (the run's end) or
    metric (those of the best held-out task metric, ``judge.task_judge``; loss where the data
    has none)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (also written at each epoch's end); 0: only at epochs' ends."""
    reparam: str | None = None
    """none, or residual: prompt rows trained through a residual MLP (``reparam.Residual``),
    saved as plain rows. Prompt tuning only. None: ``TASK_REPARAM`` for prompt tuning on
    prompt/completion or chat data, else none."""

    def __post_init__(self) -> None:
        if self.virtual_tokens < 1:
            raise UserError("--virtual-tokens must be at least 1")
        if self.method is not None and self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}")
        if self.init is not None and self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}")
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise UserError("--init text needs --init-text")
        if self.init == "file" and not self.init_from:
            raise UserError("--init file needs --init-from ADAPTER")
        if self.epochs is not None and self.epochs < 1:
            raise UserError("--epochs must be at least 1")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise UserError("--max-epochs must be at least 1")
        epochs, cap = self.epochs, self.max_epochs
        if epochs is not None and cap is not None and cap < epochs:
            raise UserError(f"--max-epochs ({cap}) must be at least --epochs ({epochs})")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be from 0 to {2**63 - 1}")
        if self.lr is not None and not self.lr > 0:
            raise UserError("--lr must be positive")
        if self.weight_decay is not None and not 0 <= self.weight_decay < 1:
            raise UserError("--weight-decay must be from 0 to below 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.max_length is not None and self.max_length < 2:
            raise UserError("--max-length must be at least 2")
        if not 0 < self.heldout_fraction < 1:
            raise UserError("--heldout-fraction must be above 0 and below 1")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.keep not in KEEPS:
            raise UserError(f"--keep must be one of {', '.join(KEEPS)}")
        if self.reparam is not None and self.reparam not in REPARAMS:
            raise UserError(f"--reparam must be one of {', '.join(REPARAMS)}")
        if self.reparam not in (None, "none") and self.method == "prefix":
            raise UserError(
                f"--reparam {self.reparam} reparameterises prompt rows (--method prompt); a "
                "prefix is keys and values, which it does not apply to"
            )
        for flag, value in (
            ("--warmup", self.warmup),
            ("--eval-every", self.eval_every),
            ("--patience", self.patience),
            ("--checkpoint-every", self.checkpoint_every),
        ):
            if value < 0:
                raise UserError(f"{flag} must be 0 or more")

    def resolve(
        self,
        formats: Sequence[str],
        fitted_length: int | None = None,
        source_tokens: int | None = None,
        source_method: str | None = None,
        rows_per_epoch: tuple[int, int] | None = None,
    ) -> RunConfig:
        """The complete settings of a run: those asked for, and for each left at None what the
        run's data decides. The one place a default is decided.

        Args:
            formats: the formats of the training data (text, completion, chat), one per task.
            fitted_length: what the longest training example needs on the model (the loaded
                model tokenizes); used when ``max_length`` is None.
            source_tokens: the virtual tokens of the ``init_from`` adapter, when there is one.
            source_method: the method of the ``init_from`` adapter (or of the rows a library
                caller starts from), when there is one.
            rows_per_epoch: the training rows of all tasks and the rows of one step (the batch
                times the processes) decide ``epochs`` on task data, when it is not given:
                ``(rows, rows_per_step)``; None: ``DEFAULT_EPOCHS``.
        """
        task_data = is_task_data(formats)
        asked_reparam = self.reparam not in (None, "none")
        method = self.method or source_method
        if method is None:
            method = "prompt" if asked_reparam or not task_data else TASK_METHOD
        if asked_reparam and method == "prefix":  # the prefix came from --init-from
            raise UserError(
                f"--reparam {self.reparam} reparameterises prompt rows; this run continues a "
                f"prefix (deep prompt): {self.init_from or 'its starting rows'}"
            )
        tuned_for_tasks = method == "prompt" and task_data
        prefix_lr = TASK_PREFIX_LR if task_data else 1e-2
        epochs = self.epochs
        if epochs is None:
            epochs = DEFAULT_EPOCHS
            if task_data and rows_per_epoch is not None:
                rows, per_step = rows_per_epoch
                steps = max(1, -(-rows // max(1, per_step)))
                epochs = max(DEFAULT_EPOCHS, -(-MIN_TASK_STEPS // steps))
        max_epochs = self.max_epochs
        if max_epochs is None:
            max_epochs = 2 * epochs if task_data and self.epochs is None else epochs
        epochs = min(epochs, max_epochs)  # a cap asked for below the epochs the data decides
        fields = asdict(self)
        fields.update(
            epochs=epochs,
            max_epochs=max_epochs,
            method=method,
            reparam=self.reparam or (TASK_REPARAM if tuned_for_tasks else "none"),
            virtual_tokens=self.virtual_tokens if source_tokens is None else source_tokens,
            init=self.init or ("file" if self.init_from else "vocab"),
            lr=self.lr if self.lr is not None else (prefix_lr if method == "prefix" else 3e-2),
            weight_decay=(
                self.weight_decay
                if self.weight_decay is not None
                else (TASK_WEIGHT_DECAY if tuned_for_tasks else 0.0)
            ),
            max_length=(
                self.max_length
                if self.max_length is not None
                else (fitted_length if fitted_length is not None else DEFAULT_MAX_LENGTH)
            ),
            group_by_length=(
                self.group_by_length if self.group_by_length is not None else not tuned_for_tasks
            ),
        )
        return RunConfig(**fields)


@dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A run's settings with every default decided (``TrainConfig.resolve``): what the loop
    runs on, what ``training_config.json`` records and what a resume must match."""

    epochs: int = DEFAULT_EPOCHS
    max_epochs: int = 0
    """0 (as a run recorded before the option): ``epochs``."""
    method: str = "prompt"
    init: str = "vocab"
    lr: float = 3e-2
    weight_decay: float = 0.0
    max_length: int = DEFAULT_MAX_LENGTH
    group_by_length: bool = True
    reparam: str = "none"

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        same = asdict(self)
        for free in ("compile", "checkpoint_every", "eval_batch_size", "init_from", "init_text"):
            same.pop(free)
        if same["keep"] == "best":
            same.pop("keep")  # as checkpoints written before the option had it
        if same["max_epochs"] <= same["epochs"]:
            same.pop("max_epochs")  # the same
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
    """Step of the best held-out evaluation: the rows kept and saved are that step's."""
    kept_by: str = "held-out loss"
    """What chose the rows kept: held-out loss, the last rows, or a task metric (``judge``)."""
    stopped_early: bool = False
    epochs_trained: int = 0
    """Epochs the run trained: its ``epochs``, fewer when it stopped early, more when its
    held-out loss was still improving (``max_epochs``)."""
    resumed_from: int | None = None
    """Step the run was resumed from (None: it ran from the start)."""
    config: RunConfig | None = None
    """The settings the run ran with, every default decided."""

    @property
    def loss_before(self) -> float:
        return self.evals[0]["loss"]

    @property
    def loss_after(self) -> float:
        """Held-out loss of the kept rows: the evaluation at ``best_step`` (the best one, or
        the last under ``keep="last"``)."""
        kept = [e["loss"] for e in self.evals if e["step"] == self.best_step]
        return kept[-1] if kept else min(e["loss"] for e in self.evals)


@dataclass
class Task:
    """One prompt to train: its adapter name, starting rows, training and held-out texts."""

    name: str
    initial: torch.Tensor
    texts: Sequence[str | Example]
    eval_texts: Sequence[str | Example]
