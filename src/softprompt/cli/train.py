"""``softprompt train``: parse the run's flags, read its data, resolve its settings once, run
the library's training loop, save and print.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Interrupted, UserError
from .common import (
    COVERS,
    KINDS,
    data_and_field,
    fields_of,
    load_model,
    quiet,
)

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..data import Example
    from ..prompt import SoftPromptModel
    from ..tuning.config import RunConfig, TrainConfig, TrainResult
    from ..tuning.distributed import Group


def cmd_train(args: argparse.Namespace) -> int:
    from ..tuning.checkpoint import checkpoint_dir
    from ..tuning.distributed import launched

    if args.init_from and args.init not in (None, "file"):
        raise UserError(
            f"--init-from starts from an adapter's rows; it cannot go with --init {args.init}"
        )
    specs = _task_specs(args)
    asked = _train_config(args)
    group = launched()
    if not group.main:
        args.json = True  # only rank 0 prints (and writes)
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite starts over: give one")
    quiet()
    _load_task_data(args, specs, asked)
    output = Path(args.output)
    checkpoints = checkpoint_dir(output)
    _check_train_outputs(args, specs, output, checkpoints)
    source = _init_source(args, asked)
    spm = load_model(args, group)
    config = _resolve(specs, asked, spm, source)  # every default, decided once, from here on
    _announce_training(args, specs, config, spm, group, source)
    starts = {spec.name: _start_rows(spm, spec, config, source) for spec in specs}
    if not args.json:
        _print_training_plan(specs)
    results = _run_training(args, specs, config, spm, starts, checkpoints, group)
    _check_trained(args, specs, config, spm, results, checkpoints)
    replace = args.overwrite or args.resume
    summaries = _save_trained(args, specs, config, spm, results, group, replace)
    return _end_training(args, specs, results, summaries, checkpoints, group)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """``train``'s flags as a ``TrainConfig``: what the user asked; a flag not given stays None,
    for ``TrainConfig.resolve`` to decide from the data."""
    from ..tuning.config import TrainConfig

    return TrainConfig(
        virtual_tokens=args.virtual_tokens,
        method=args.method,
        init=args.init,
        init_text=args.init_text,
        init_from=args.init_from,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        compile=args.compile,
        warmup=args.warmup,
        schedule=args.schedule,
        group_by_length=args.group_by_length,
        eval_every=args.eval_every,
        patience=args.patience,
        checkpoint_every=args.checkpoint_every,
    )


def _resolve(
    specs: list[_TaskSpec], asked: TrainConfig, spm: SoftPromptModel, source: Adapter | None
) -> RunConfig:
    """The run's settings: those asked for, the rest decided by the data, the loaded model (the
    length the longest example needs) and the ``--init-from`` adapter (its length)."""
    from ..rows import fitting_length

    fitted = None
    if asked.max_length is None:
        fitted = fitting_length(spm, [t for spec in specs for t in spec.texts])
    return asked.resolve(
        [spec.format for spec in specs],
        fitted_length=fitted,
        source_tokens=source.num_virtual_tokens if source is not None else None,
    )


def _load_task_data(args: argparse.Namespace, specs: list[_TaskSpec], config: TrainConfig) -> None:
    """Each task's training and held-out examples: ``--eval-data``, a bundled set's held-out
    part, or a split of the data kept in the adapter folder (``HELDOUT_FILE``)."""
    from ..data import heldout_source, load_texts, split_heldout
    from ..tuning.config import HELDOUT_FILE

    for spec in specs:
        data = load_texts(spec.data, spec.field, args.max_samples, fields_of(args))
        spec.field, spec.format = data.field, data.format
        spec.eval_source = args.eval_data or heldout_source(spec.data)
        if spec.eval_source:
            spec.texts = data.examples
            text_field = spec.field if data.format == "text" else None
            held = load_texts(spec.eval_source, text_field, None, fields_of(args))
            if held.format != data.format:
                raise UserError(
                    f"{spec.eval_source} holds {held.format} examples and {spec.data} "
                    f"{data.format} examples: held-out data must be of the training data's format"
                )
            spec.eval_texts = held.examples
        else:
            # The held-out texts are saved in the adapter folder, so eval and report reuse them.
            spec.texts, spec.split = split_heldout(
                data.examples, config.heldout_fraction, config.seed
            )
            spec.eval_texts = spec.split
            spec.eval_source = HELDOUT_FILE


def _check_train_outputs(
    args: argparse.Namespace, specs: list[_TaskSpec], output: Path, checkpoints: Path
) -> None:
    """Refuse to replace what the user made, and settle a left-over checkpoint: resume it
    (``--resume``), remove it (``--overwrite``), or stop with a line saying which to give."""
    from ..files import check_output
    from ..tuning.checkpoint import STATE_FILE
    from ..tuning.checkpoint import remove as remove_checkpoint

    if args.resume and not (checkpoints / STATE_FILE).is_file():
        raise UserError(
            f"nothing to resume for {output}: no checkpoint at {checkpoints} (a run writes one "
            "every --checkpoint-every steps and at each epoch's end, and removes it when done)"
        )
    # A resumed run finishes what the checkpointed run was allowed to do: that run passed this
    # check before it started (an empty target, or --overwrite), and may have saved some of its
    # adapters already. Folders that are not adapters are still never replaced.
    replace = args.overwrite or args.resume
    for spec in specs:
        check_output(spec.output, replace)
    if not args.resume and checkpoints.exists():
        if not args.overwrite:
            raise UserError(
                f"an interrupted run writing {output} left a checkpoint ({checkpoints}): "
                "add --resume to continue it, or --overwrite to start over"
            )
        remove_checkpoint(checkpoints)


def _init_source(args: argparse.Namespace, config: TrainConfig) -> Adapter | None:
    """The adapter ``--init-from`` names (None without it); its length becomes the run's."""
    from ..adapters import load_adapter

    source = None
    if config.init_from:
        source = load_adapter(config.init_from, allow_pickle=args.allow_pickle)
        if source.method == "prefix" and config.method == "prompt":
            raise UserError(
                f"--init-from {config.init_from} is a prefix (deep prompt) adapter; continue it "
                "with --method prefix"
            )
    return source


def _announce_training(
    args: argparse.Namespace,
    specs: list[_TaskSpec],
    config: RunConfig,
    spm: SoftPromptModel,
    group: Group,
    source: Adapter | None,
) -> None:
    """Checks that need the model, the max length the data needs, and what the loss covers."""
    if config.method == "prefix":
        shape = spm.prefix_shape  # refuses a model whose cache a prefix cannot fit
        if source is not None and source.method == "prefix":
            mismatch = shape.mismatch(source.config, source.token_dim)
            if mismatch:
                raise UserError(f"--init-from {config.init_from}: {mismatch}")
    if args.max_length is None and not args.json:
        from ..rows import MAX_LENGTH_CAP

        why = (
            "the longest training text's, EOS included"
            if config.max_length < MAX_LENGTH_CAP
            else "the cap; longer texts are cut, --max-length sets another"
        )
        print(f"max length: {config.max_length} text tokens ({why})")
    if not args.json:
        from ..rows import scored_tokens, training_rows

        for spec in specs:
            if spec.format in COVERS:
                scored, total = scored_tokens(
                    training_rows(spm, spec.texts, None, config.max_length)[0]
                )
                print(
                    f"scoring {COVERS[spec.format]}"
                    + (f" of {spec.name}" if len(specs) > 1 else "")
                    + f": {scored:,} of {total:,} tokens"
                )
    if group.active and group.main:
        print(
            f"data parallel over {group.world} processes: {config.batch_size} rows each, "
            f"{config.batch_size * group.world} a step"
        )
    if source is not None and source.method == "prompt" and source.token_dim != spm.hidden_size:
        raise UserError(
            f"--init-from adapter has token_dim {source.token_dim}, the model has {spm.hidden_size}"
        )


def _start_rows(
    spm: SoftPromptModel, spec: _TaskSpec, config: RunConfig, source: Adapter | None
) -> Any:
    """The rows training starts from (per task: ``--init labels`` reads its labels)."""
    from ..tuning.init import init_prefix, init_prompt

    if source is not None and source.method == config.method:
        return source.weights  # continue the adapter as it is
    rows = source.weights if source is not None else None  # a prompt to deepen
    if config.init == "labels":
        if spec.format != "completion":
            raise UserError(
                f"--init labels starts from the completions of prompt/completion data; "
                f"{spec.data} holds {KINDS[spec.format]}"
            )
        labels = list(dict.fromkeys(e.completion for e in spec.texts))
        rows = init_prompt(spm.base, config.virtual_tokens, "labels", None, config.seed, labels)
        if config.method == "prompt":
            return rows
    if config.method == "prefix":
        return init_prefix(
            spm.base,
            config.virtual_tokens,
            config.init,
            config.init_text,
            config.seed,
            rows=rows,
        )
    return init_prompt(spm.base, config.virtual_tokens, config.init, config.init_text, config.seed)


def _print_training_plan(specs: list[_TaskSpec]) -> None:
    from ..tuning.config import HELDOUT_FILE

    for spec in specs:
        print(
            f"training {spec.name} on {spec.data} ({len(spec.texts)} {KINDS[spec.format]}, "
            f"field {spec.field!r}); held out: {len(spec.eval_texts)}"
            + (
                f" from {spec.eval_source}"
                if spec.split is None
                else f" of {spec.data}, kept in {spec.output / HELDOUT_FILE}"
            )
        )
    if len(specs) > 1:
        print(f"{len(specs)} prompts in one run, their rows sharing batches")


def _run_training(
    args: argparse.Namespace,
    specs: list[_TaskSpec],
    config: RunConfig,
    spm: SoftPromptModel,
    starts: dict[str, Any],
    checkpoints: Path,
    group: Group,
) -> list[TrainResult]:
    """``train_tasks``, stopped cleanly by Ctrl-C, SIGTERM or a lost data-parallel peer (the
    message says whether a checkpoint to ``--resume`` from is kept)."""
    import signal

    from ..tuning.checkpoint import STATE_FILE
    from ..tuning.config import Task
    from ..tuning.distributed import PeerLost
    from ..tuning.train import train_tasks

    def stopped(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM (a launcher stopping the run because another process of it failed, or a job
    # scheduler) ends training like Ctrl-C: with the message below, not silently.
    previous = signal.signal(signal.SIGTERM, stopped)
    tasks = [Task(s.name, starts[s.name].clone(), s.texts, s.eval_texts) for s in specs]
    try:
        results = train_tasks(
            spm,
            tasks,
            config,
            progress=not args.json,
            checkpoints=checkpoints,
            resume=args.resume,
            group=group,
        )
    except PeerLost as exc:
        kept = (
            f"the last checkpoint is kept in {checkpoints}: run the same command with --resume"
            if (checkpoints / STATE_FILE).is_file()
            else "no checkpoint was written yet"
        )
        raise UserError(
            f"another process of this data-parallel run stopped ({exc}); {kept}"
        ) from exc
    except KeyboardInterrupt as exc:
        message = ""
        if group.main:
            why = f"stopped by {exc}" if str(exc) else "interrupted"
            if group.active:
                why += " (another process of this data-parallel run stopped, or its launcher)"
            kept = (
                f"the last checkpoint is kept in {checkpoints}: run the same command with --resume"
                if (checkpoints / STATE_FILE).is_file()
                else "no checkpoint was written yet"
            )
            message = f"softprompt: training {why}; {kept}"
        raise Interrupted(message) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results


def _check_trained(
    args: argparse.Namespace,
    specs: list[_TaskSpec],
    config: RunConfig,
    spm: SoftPromptModel,
    results: list[TrainResult],
    checkpoints: Path,
) -> None:
    """Say what was resumed and cut; a changed base model is a bug (the rows are rescued)."""
    from ..tuning.train import rescue_trained

    if results[0].resumed_from is not None and not args.json:
        print(f"resumed at step {results[0].resumed_from} from {checkpoints}")
    for spec, result in zip(specs, results, strict=True):
        if result.texts_cut and not args.json:
            print(
                f"note: {result.texts_cut} of {len(spec.texts)} training texts"
                + (f" of {spec.name}" if len(specs) > 1 else "")
                + f" did not fit in --max-length {config.max_length} (tokens, EOS included): "
                "they were cut and trained without an EOS"
            )
        if result.base_checksum_after != result.base_checksum_before:
            # A bug, not the user's doing; the trained rows are kept all the same.
            rescued = [
                rescue_trained(spm, s.name, config, r) for s, r in zip(specs, results, strict=True)
            ]
            raise AssertionError(
                "training changed the base model's weights; the trained prompts were kept in "
                + ", ".join(str(k) for k in rescued)
            )


def _save_trained(
    args: argparse.Namespace,
    specs: list[_TaskSpec],
    config: RunConfig,
    spm: SoftPromptModel,
    results: list[TrainResult],
    group: Group,
    replace: bool,
) -> list[dict[str, Any]]:
    """Save each adapter (rank 0) and return the JSON summaries."""
    from ..tuning.train import save_trained

    summaries = []
    for spec, result in zip(specs, results, strict=True):
        extra = {
            "data": spec.data,
            "text_field": spec.field,
            "data_format": spec.format,
            "eval_data": spec.eval_source,
            "max_samples": args.max_samples,
            "device": str(spm.device),
            "dtype": str(spm.embedding.weight.dtype).removeprefix("torch."),
        }
        if group.active:
            extra["processes"] = group.world
        if len(specs) > 1:
            extra["trained_with"] = [s.name for s in specs if s is not spec]
        if group.main:
            save_trained(
                spm,
                spec.name,
                spec.output,
                config,
                result,
                extra,
                overwrite=replace,
                heldout=spec.split,
            )
        summaries.append(
            {
                "adapter": str(spec.output),
                "trainable_params": result.trainable_params,
                "total_params": result.total_params,
                "heldout_loss_before": result.loss_before,
                "heldout_loss_after": result.loss_after,
                "seconds": result.seconds,
                "texts_cut": result.texts_cut,
                "samples_per_second": result.samples / max(result.seconds, 1e-9),
                "best_step": result.best_step,
                "stopped_early": result.stopped_early,
                "resumed_from": result.resumed_from,
            }
        )
    return summaries


def _end_training(
    args: argparse.Namespace,
    specs: list[_TaskSpec],
    results: list[TrainResult],
    summaries: list[dict[str, Any]],
    checkpoints: Path,
    group: Group,
) -> int:
    """Remove the finished run's checkpoint, let every process go, print the summary."""
    from ..tuning.checkpoint import remove as remove_checkpoint
    from ..tuning.distributed import barrier, shutdown
    from ..tuning.train import trainable_summary

    if group.main:
        remove_checkpoint(checkpoints)  # the run is done and saved
    barrier(group)
    shutdown(group)
    if not group.main:
        return 0
    if args.json:
        if args.task:
            print(json.dumps({"tasks": summaries}))
        else:
            print(json.dumps(summaries[0]))
        return 0
    print(trainable_summary(results[0].trainable_params, results[0].total_params))
    for spec, result in zip(specs, results, strict=True):
        print(
            (f"{spec.name}: " if len(specs) > 1 else "")
            + f"held-out loss {result.loss_before:.3f} -> {result.loss_after:.3f} "
            f"(best at step {result.best_step}"
            + (", stopped early" if result.stopped_early else "")
            + "); "
            f"{result.seconds:.0f} s; saved to {spec.output} "
            f"(loss plot: {spec.output / 'loss.png'})"
        )
    return 0


@dataclass
class _TaskSpec:
    """One prompt ``train`` makes: from ``--data`` or a ``--task NAME=DATA[:FIELD]``."""

    name: str
    data: str
    field: str | None
    output: Path
    texts: list[Example] = dataclass_field(default_factory=list)
    eval_texts: list[Example] = dataclass_field(default_factory=list)
    eval_source: str | None = None
    split: list[Example] | None = None
    format: str = "text"


def _task_specs(args: argparse.Namespace) -> list[_TaskSpec]:
    """The prompts to train, checked before anything loads (duplicate or bad task names)."""
    output = Path(args.output)
    if not args.task:
        if not args.data:
            raise UserError("give --data DATA (one prompt) or --task NAME=DATA (repeatable)")
        name = output.expanduser().resolve().name
        return [_TaskSpec(name, args.data, args.text_field, output)]
    if args.data:
        raise UserError(
            "give --data (one prompt written to --output) or --task (one prompt per task, "
            "each in --output/NAME), not both"
        )
    if args.eval_data:
        raise UserError(
            "--eval-data goes with --data; with --task each task is held out from its own data "
            "(the bundled held-out part for examples:, else 10%)"
        )
    specs: list[_TaskSpec] = []
    for item in args.task:
        name, sep, source = item.partition("=")
        name = name.strip()
        if not sep or not name or not source:
            raise UserError(f"--task {item!r}: expected NAME=DATA or NAME=DATA:FIELD")
        if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"--task {item!r}: {name!r} cannot be a folder name; choose another")
        data, field = data_and_field(source)
        if any(s.name == name for s in specs):
            raise UserError(f"--task {name!r} is given twice; each task needs its own name")
        specs.append(_TaskSpec(name, data, field or args.text_field, output / name))
    return specs


def cmd_demo(args: argparse.Namespace) -> int:
    quiet()
    from .demo import run_demo

    run_demo(
        Path(args.output),
        model=args.model,
        overwrite=args.overwrite,
        device=args.device,
        dtype=args.dtype,
    )
    return 0
