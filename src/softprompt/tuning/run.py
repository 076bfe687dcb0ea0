"""A whole training run, as ``softprompt train`` makes it: ``plan_training`` reads each task's
data and held-out part, checks the outputs and any checkpoint, loads the model, resolves the
settings once and picks the starting rows; ``run_training`` trains, checks and saves, and
rescues the trained rows when they cannot be saved. Both print nothing: the command prints
what the plan and the results say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..adapters import Adapter, load_adapter
from ..data import KINDS, Example, Fields, heldout_source, load_texts, split_heldout
from ..errors import Interrupted, UserError
from ..files import check_output
from ..prompt import SoftPromptModel
from ..rows import MAX_LENGTH_CAP, fitting_length, scored_tokens, training_rows
from . import checkpoint
from .config import HELDOUT_FILE, RunConfig, Task, TrainConfig, TrainResult
from .distributed import (
    SINGLE,
    Group,
    PeerLost,
    check_shardable,
    gather,
    shard_layers,
    sum_,
    weight_bytes,
)
from .init import init_prefix, init_prompt
from .save import rescue_trained, save_trained
from .search import Candidate, asking, candidates, run_search, winner_of
from .train import train_tasks

MIN_ROWS_TO_SEARCH = 20
"""Fewest training rows (per task) a run searches on."""


@dataclass(frozen=True)
class TaskSource:
    """One prompt a run makes: its adapter name, its data (a file, a Hub dataset or a bundled
    ``examples:`` set) with the field holding plain texts, and the folder it is saved to."""

    name: str
    data: str
    output: Path
    field: str | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"task name {name!r} cannot be a folder name; choose another")


@dataclass(frozen=True)
class RunRequest:
    """What a user asks of a run: the tasks, the settings (``None`` fields are decided from the
    data), where held-out data comes from, and what may be replaced or resumed."""

    tasks: Sequence[TaskSource]
    config: TrainConfig
    output: Path
    """The run's folder: its checkpoint lives there (``checkpoint.checkpoint_dir``)."""
    eval_data: str | None = None
    """Held-out data for a single task (default: the bundled held-out part of an ``examples:``
    set, else a split of the data kept in the adapter folder as ``HELDOUT_FILE``)."""
    max_samples: int | None = None
    fields: Fields = field(default_factory=Fields)
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    shard: bool = False
    """Shard the base model's decoder layers across the processes of a distributed launch
    (``distributed.shard_layers``): each holds about 1/N of their weights."""
    search: bool | None = None
    """Choose the method and learning rate left open by trials on the data (``search``);
    None or False: no search (it never beat the defaults on generated tasks, measured in
    docs/benchmarks/tasks.md)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise UserError("a training run needs at least one task")
        names = [t.name for t in self.tasks]
        for name in names:
            if names.count(name) > 1:
                raise UserError(f"task {name!r} is given twice; each task needs its own name")
        if self.eval_data and len(self.tasks) > 1:
            raise UserError(
                "held-out data (--eval-data) goes with one task; with several, each is held out "
                "from its own data (the bundled held-out part for examples:, else "
                "--heldout-fraction of it)"
            )
        if self.resume and self.overwrite:
            raise UserError("--resume continues a run and --overwrite starts over: give one")
        config = self.config
        if self.shard and config.compile:
            raise UserError(
                "--compile with --shard is not supported: compiling the FSDP-sharded layers "
                "is not tested here; train sharded without --compile"
            )
        if config.init_from and config.init not in (None, "file"):
            raise UserError(
                f"--init-from starts from an adapter's rows; it cannot go with --init {config.init}"
            )


@dataclass
class PlannedTask:
    """A task with its data read: training examples, held-out examples and where they came
    from (``split`` holds the held-out examples split off the data, saved with the adapter)."""

    source: TaskSource
    format: str
    field: str | None
    texts: list[Example]
    eval_texts: list[Example]
    eval_source: str
    split: list[Example] | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def output(self) -> Path:
        return self.source.output


@dataclass
class TrainingPlan:
    """A run ready to start: every setting decided (``config``), the model loaded, each task's
    data and starting rows."""

    request: RunRequest
    tasks: list[PlannedTask]
    config: RunConfig
    spm: SoftPromptModel
    starts: dict[str, Any]
    source: Adapter | None
    group: Group
    checkpoints: Path
    weights_held: list[dict[str, int]] | None = None
    """Sharded: each process's bytes of base weights, sharded and whole (``weight_bytes``)."""
    trials: list[Candidate] = field(default_factory=list)
    """The candidates a search tries before training (none: the run does not search)."""
    no_search: str = ""
    """Why the run does not search, where a user may wonder."""
    record: dict[str, Any] | None = None
    """What the search tried and chose, once it has run (or a resumed run read it)."""
    search_line: str = ""
    """The search's result in one line, for the command to print."""

    @property
    def length_fitted(self) -> bool:
        """Whether the max length was decided by the data (not asked for)."""
        return self.request.config.max_length is None

    @property
    def length_capped(self) -> bool:
        return self.config.max_length >= MAX_LENGTH_CAP

    def coverage(self) -> list[tuple[PlannedTask, int, int]]:
        """For tasks whose loss covers part of each example (completions, assistant turns):
        the task, its scored tokens and all its text tokens."""
        out = []
        for task in self.tasks:
            if task.format != "text":
                rows = training_rows(self.spm, task.texts, None, self.config.max_length)[0]
                out.append((task, *scored_tokens(rows)))
        return out


@dataclass
class TrainedTask:
    """A task's result and where its adapter was saved."""

    task: PlannedTask
    result: TrainResult


def plan_training(
    request: RunRequest, load: Callable[[], SoftPromptModel], group: Group = SINGLE
) -> TrainingPlan:
    """Everything a run checks and decides before its first step, in order: each task's data and
    held-out part, the outputs (never replacing what the user made) and any checkpoint, the
    ``init_from`` adapter, the model (``load()``), the settings (``TrainConfig.resolve``, once)
    and each task's starting rows.

    Raises:
        UserError: anything the user can fix, in one line.
    """
    if request.shard:
        check_shardable(group)
    tasks = [_read_task(request, source) for source in request.tasks]
    checkpoints = checkpoint.checkpoint_dir(request.output)
    _check_outputs(request, checkpoints)
    source = _init_source(request)
    trials, no_search = _trials(request, tasks, source, group)  # refused before the model loads
    spm = load()
    held = None
    if request.shard:
        if not any(hasattr(p, "to_local") for p in spm.model.parameters()):
            shard_layers(spm.model, group, spm.device)  # a loader that did not shard
        group = replace(group, sharded=True)
        held = gather(group, weight_bytes(spm.model))
    fitted = None
    if request.config.max_length is None:
        fitted = fitting_length(spm, [t for task in tasks for t in task.texts])
    config = request.config.resolve(
        [task.format for task in tasks],
        fitted_length=fitted,
        source_tokens=source.num_virtual_tokens if source is not None else None,
        source_method=source.method if source is not None else None,
        rows_per_epoch=_rows_per_epoch(request.config, tasks, group),
    )
    _check_model(spm, config, source)
    starts = {task.name: _start_rows(spm, task, config, source) for task in tasks}
    plan = TrainingPlan(request, tasks, config, spm, starts, source, group, checkpoints, held)
    plan.trials, plan.no_search = trials, no_search
    return plan


def _rows_per_epoch(config: TrainConfig, tasks: list[PlannedTask], group: Group) -> tuple[int, int]:
    """The training rows of all tasks, and the rows of one step (the batch, every process's)."""
    return sum(len(t.texts) for t in tasks), config.batch_size * group.world


def _trials(
    request: RunRequest, tasks: list[PlannedTask], source: Adapter | None, group: Group
) -> tuple[list[Candidate], str]:
    """The candidates the run's search tries (none: no search), and why there is none.

    Raises:
        UserError: ``--search`` asked for where it cannot run.
    """
    source_method = source.method if source is not None else None
    found = candidates(request.config, [t.format for t in tasks], source_method)
    asked = request.search
    why = ""
    if not asked:
        why = "--no-search" if asked is False else "not asked for (--search)"
    elif not found:
        why = (
            "nothing left open to choose (--method or --init-from, and --lr)"
            if any(t.format != "text" for t in tasks)
            else "plain text has no task to choose on"
        )
    elif group.active:
        why = "a distributed run does not search"
    elif min(len(t.texts) for t in tasks) < MIN_ROWS_TO_SEARCH:
        why = f"fewer than {MIN_ROWS_TO_SEARCH} training rows"
    if why and asked:
        raise UserError(f"--search cannot run: {why}; pin --method and --lr, or drop --search")
    return ([] if why else found), why


def _search(plan: TrainingPlan, progress: bool) -> None:
    """Choose the plan's method and learning rate by its search (or take the choice of the
    run being resumed), and make the plan train the winner."""
    if not plan.trials:
        return
    request, spm = plan.request, plan.spm
    formats = [t.format for t in plan.tasks]
    source = plan.source

    def resolve(asked: TrainConfig) -> RunConfig:
        return asked.resolve(
            formats,
            fitted_length=plan.config.max_length,
            source_tokens=source.num_virtual_tokens if source is not None else None,
            source_method=source.method if source is not None else None,
            rows_per_epoch=_rows_per_epoch(request.config, plan.tasks, plan.group),
        )

    def starts(config: RunConfig) -> list[Any]:
        return [_start_rows(spm, task, config, source) for task in plan.tasks]

    record = checkpoint.record(plan.checkpoints) if request.resume else None
    if request.resume and (record is None or "search" not in record):
        return  # the run resumed did not search: its checkpoint's settings are the plan's
    if record is None:
        try:
            result = run_search(
                spm,
                [(t.name, t.texts) for t in plan.tasks],
                request.config,
                plan.config,
                plan.trials,
                starts,
                resolve,
                progress,
            )
        except KeyboardInterrupt as exc:
            why = f"stopped by {exc}" if str(exc) else "interrupted"
            raise Interrupted(
                f"softprompt: training {why} during its search, before its first step; "
                "nothing was written"
            ) from exc
        record = {"search": result.as_json()}
        plan.search_line = result.summary()
    else:
        plan.search_line = f"search: {record['search']['winner']} (chosen before the resume)"
    plan.config = resolve(asking(request.config, winner_of(record["search"])))
    _check_model(spm, plan.config, source)
    plan.starts = {t.name: rows for t, rows in zip(plan.tasks, starts(plan.config), strict=True)}
    plan.record = record


def run_training(plan: TrainingPlan, progress: bool = True) -> list[TrainedTask]:
    """Train the plan's prompts in one run, check them and save each adapter (the first process
    only), then remove the run's checkpoint.

    Raises:
        Interrupted: Ctrl-C (or a ``KeyboardInterrupt`` raised for SIGTERM); the message says
            whether a checkpoint to resume from is kept.
        UserError: another process of a data-parallel run stopped, or an adapter cannot be
            saved (the message says where its rows were rescued to).
    """
    _search(plan, progress)
    results = _train(plan, progress)
    _check_base_unchanged(plan, results)
    request, group = plan.request, plan.group
    failure: Exception | None = None
    if group.main:
        try:
            for task, result in zip(plan.tasks, results, strict=True):
                save_trained(
                    plan.spm,
                    task.name,
                    task.output,
                    plan.config,
                    result,
                    _record(plan, task),
                    overwrite=request.overwrite or request.resume,
                    heldout=task.split,
                )
            checkpoint.remove(plan.checkpoints)  # the run is done and saved
        except Exception as exc:  # noqa: BLE001 - the others hear of it below, then it is raised
            failure = exc
    # Every process learns whether rank 0 saved (not a barrier, where the others would wait
    # for a rank 0 that has stopped until the group's timeout, and end with a traceback).
    _settle_save(group, failure, [t.output for t in plan.tasks])
    return [TrainedTask(task, result) for task, result in zip(plan.tasks, results, strict=True)]


def _settle_save(group: Group, failure: Exception | None, outputs: list[Path]) -> None:
    """Raise rank 0's save failure in rank 0, and a ``UserError`` saying it in every other
    process; return when rank 0 saved."""
    first = None
    if group.active:
        # Whether rank 0 failed: one small all-reduce, as every training step makes; only then
        # its message, gathered.
        failed = torch.tensor([0.0 if failure is None else 1.0])
        try:
            sum_(group, failed)
            if failed.item() > 0:
                said = None if failure is None else str(failure) or repr(failure)
                first = gather(group, said)[0]
        except (PeerLost, RuntimeError) as exc:  # the group is gone
            raise UserError(f"another process of this data-parallel run stopped ({exc})") from exc
    if failure is not None:
        raise failure
    if first is not None:
        where = ", ".join(str(o) for o in outputs)
        raise UserError(f"rank 0 could not save {where}, so this process stops too: {first}")


def _read_task(request: RunRequest, source: TaskSource) -> PlannedTask:
    """A task's training examples and held-out ones: ``eval_data``, a bundled set's held-out
    part, or a split of the data (kept in the adapter folder)."""
    config, fields = request.config, request.fields
    data = load_texts(source.data, source.field, request.max_samples, fields)
    eval_source = request.eval_data or heldout_source(source.data)
    if eval_source:
        text_field = data.field if data.format == "text" else None
        held = load_texts(eval_source, text_field, None, fields)
        if held.format != data.format:
            raise UserError(
                f"{eval_source} holds {held.format} examples and {source.data} "
                f"{data.format} examples: held-out data must be of the training data's format"
            )
        examples = data.examples
        return PlannedTask(source, data.format, data.field, examples, held.examples, eval_source)
    texts, split = split_heldout(data.examples, config.heldout_fraction, config.seed)
    return PlannedTask(source, data.format, data.field, texts, split, HELDOUT_FILE, split)


def _check_outputs(request: RunRequest, checkpoints: Path) -> None:
    """Refuse to replace what the user made, and settle a left-over checkpoint: resume it,
    remove it (``overwrite``), or stop with a line saying which to give."""
    if request.resume and not (checkpoints / checkpoint.STATE_FILE).is_file():
        raise UserError(
            f"nothing to resume for {request.output}: no checkpoint at {checkpoints} (a run "
            "writes one every --checkpoint-every steps and at each epoch's end, and removes it "
            "when done)"
        )
    # A resumed run finishes what the checkpointed run was allowed to do: that run passed this
    # check before it started (an empty target, or --overwrite), and may have saved some of its
    # adapters already. Folders that are not adapters are still never replaced.
    for task in request.tasks:
        check_output(task.output, request.overwrite or request.resume)
    if not request.resume and checkpoints.exists():
        if not request.overwrite:
            raise UserError(
                f"an interrupted run writing {request.output} left a checkpoint ({checkpoints}): "
                "add --resume to continue it, or --overwrite to start over"
            )
        checkpoint.remove(checkpoints)


def _init_source(request: RunRequest) -> Adapter | None:
    """The adapter ``init_from`` names (None without it); its length becomes the run's."""
    config = request.config
    if not config.init_from:
        return None
    source = load_adapter(config.init_from, allow_pickle=request.allow_pickle)
    if source.method == "prefix" and config.method == "prompt":
        raise UserError(
            f"--init-from {config.init_from} is a prefix (deep prompt) adapter; continue it "
            "with --method prefix"
        )
    return source


def _check_model(spm: SoftPromptModel, config: RunConfig, source: Adapter | None) -> None:
    """What only the loaded model can tell: a prefix fits its cache, and an ``init_from``
    adapter fits its shapes."""
    if config.method == "prefix":
        shape = spm.prefix_shape  # refuses a model whose cache a prefix cannot fit
        if source is not None and source.method == "prefix":
            mismatch = shape.mismatch(source.config, source.token_dim)
            if mismatch:
                raise UserError(f"--init-from {config.init_from}: {mismatch}")
    if source is not None and source.method == "prompt" and source.token_dim != spm.hidden_size:
        raise UserError(
            f"--init-from adapter has token_dim {source.token_dim}, the model has {spm.hidden_size}"
        )


def _start_rows(
    spm: SoftPromptModel, task: PlannedTask, config: RunConfig, source: Adapter | None
) -> Any:
    """The rows training starts from (per task: ``init`` labels reads the task's labels)."""
    if source is not None and source.method == config.method:
        return source.weights  # continue the adapter as it is
    rows = source.weights if source is not None else None  # a prompt to deepen
    if config.init == "labels":
        if task.format != "completion":
            raise UserError(
                f"--init labels starts from the completions of prompt/completion data; "
                f"{task.source.data} holds {KINDS[task.format]}"
            )
        labels = list(dict.fromkeys(e.completion for e in task.texts))
        rows = init_prompt(spm.base, config.virtual_tokens, "labels", None, config.seed, labels)
        if config.method == "prompt":
            return rows
    if config.method == "prefix":
        return init_prefix(
            spm.base, config.virtual_tokens, config.init, config.init_text, config.seed, rows=rows
        )
    return init_prompt(spm.base, config.virtual_tokens, config.init, config.init_text, config.seed)


def _train(plan: TrainingPlan, progress: bool) -> list[TrainResult]:
    """``train_tasks`` on the plan; an interruption or a lost peer becomes a one-line error that
    says whether a checkpoint to resume from is kept."""
    group, checkpoints = plan.group, plan.checkpoints
    tasks = [Task(t.name, plan.starts[t.name].clone(), t.texts, t.eval_texts) for t in plan.tasks]

    def kept() -> str:
        if (checkpoints / checkpoint.STATE_FILE).is_file():
            return (
                f"the last checkpoint is kept in {checkpoints}: run the same command with --resume"
            )
        return "no checkpoint was written yet"

    try:
        return train_tasks(
            plan.spm,
            tasks,
            plan.config,
            progress=progress,
            checkpoints=checkpoints,
            resume=plan.request.resume,
            group=group,
            record=plan.record,
        )
    except PeerLost as exc:
        raise UserError(
            f"another process of this data-parallel run stopped ({exc}); {kept()}"
        ) from exc
    except KeyboardInterrupt as exc:
        message = ""
        if group.main:
            why = f"stopped by {exc}" if str(exc) else "interrupted"
            if group.active:
                why += " (another process of this data-parallel run stopped, or its launcher)"
            message = f"softprompt: training {why}; {kept()}"
        raise Interrupted(message) from exc


def _check_base_unchanged(plan: TrainingPlan, results: list[TrainResult]) -> None:
    """A changed base model is a bug, not the user's doing: the trained rows are rescued all
    the same, and the error says where."""
    if all(r.base_checksum_after == r.base_checksum_before for r in results):
        return
    rescued = [
        rescue_trained(plan.spm, t.name, plan.config, r)
        for t, r in zip(plan.tasks, results, strict=True)
    ]
    raise AssertionError(
        "training changed the base model's weights; the trained prompts were kept in "
        + ", ".join(str(k) for k in rescued)
    )


def _record(plan: TrainingPlan, task: PlannedTask) -> dict[str, Any]:
    """What ``training_config.json`` records beside the settings: the data and the machine."""
    extra: dict[str, Any] = {
        "data": task.source.data,
        "text_field": task.field,
        "data_format": task.format,
        "eval_data": task.eval_source,
        "max_samples": plan.request.max_samples,
        "device": str(plan.spm.device),
        "dtype": str(plan.spm.embedding.weight.dtype).removeprefix("torch."),
    }
    if plan.group.active:
        extra["processes"] = plan.group.world
    if plan.weights_held is not None:
        extra["sharded"] = True
        extra["weights_held"] = plan.weights_held
    if plan.record is not None:
        extra["search"] = plan.record["search"]
    elif plan.no_search:
        extra["search"] = {"ran": False, "why": plan.no_search}
    if len(plan.tasks) > 1:
        extra["trained_with"] = [t.name for t in plan.tasks if t is not task]
    return extra
