"""What each ``softprompt`` command does: turn parsed arguments into library calls and print.

Heavy imports (torch, transformers) happen inside the functions, so ``softprompt --help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Interrupted, UserError

if TYPE_CHECKING:
    from ..data import Example, Fields
    from ..prompt import Adapter, SoftPromptModel
    from ..tuning.config import RunConfig, TrainConfig, TrainResult
    from ..tuning.distributed import Group


def _quiet() -> None:
    """Silence library chatter that is not ours (weight-loading bars, deprecation notes)."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load_base(args: argparse.Namespace, group: Any = None) -> Any:
    """The base model of ``--model`` on ``--device`` in ``--dtype`` (flags a command lacks
    take their defaults). In a data-parallel ``group``, joins it first (on this process's GPU)."""
    from ..device import resolve
    from ..models import load_base_model
    from ..tuning.distributed import device_for, setup

    device, dtype = resolve(getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))
    if group is not None:
        device = device_for(group, device)
        if device.type == "cuda" and device.index is not None:  # a process of a group
            import torch

            torch.cuda.set_device(device)
        setup(device)
    return load_base_model(args.model, dtype=dtype, device=device)


def _load_model(args: argparse.Namespace, group: Any = None) -> Any:
    from ..prompt import SoftPromptModel

    return SoftPromptModel(_load_base(args, group))


def _read_adapters(folders: list[str], allow_pickle: bool) -> list[Any]:
    """Read adapter folders (before any model is loaded, so bad ones fail fast)."""
    from ..prompt import load_adapter

    adapters = [load_adapter(folder, allow_pickle=allow_pickle) for folder in folders]
    names = [a.name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two adapters are named {name!r}; give them distinct folders")
    return adapters


def _add_adapters(spm: Any, adapters: list[Any]) -> list[str]:
    """Load read adapters into ``spm``; returns their names (folder names)."""
    for adapter in adapters:
        made_for = adapter.config.get("base_model_name_or_path")
        if made_for and made_for != spm.base.name:
            print(
                f"softprompt: note: {adapter.name} was trained on {made_for}, "
                f"loading it on {spm.base.name}",
                file=sys.stderr,
            )
        spm.add_adapter(adapter)
    return [a.name for a in adapters]


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet()
    from .demo import run_demo

    run_demo(
        Path(args.output),
        model=args.model,
        overwrite=args.overwrite,
        device=args.device,
        dtype=args.dtype,
    )
    return 0


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
    _quiet()
    _load_task_data(args, specs, asked)
    output = Path(args.output)
    checkpoints = checkpoint_dir(output)
    _check_train_outputs(args, specs, output, checkpoints)
    source = _init_source(args, asked)
    spm = _load_model(args, group)
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
        data = load_texts(spec.data, spec.field, args.max_samples, _fields(args))
        spec.field, spec.format = data.field, data.format
        spec.eval_source = args.eval_data or heldout_source(spec.data)
        if spec.eval_source:
            spec.texts = data.examples
            text_field = spec.field if data.format == "text" else None
            held = load_texts(spec.eval_source, text_field, None, _fields(args))
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
    from ..prompt import load_adapter

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
            if spec.format in _COVERS:
                scored, total = scored_tokens(
                    training_rows(spm, spec.texts, None, config.max_length)[0]
                )
                print(
                    f"scoring {_COVERS[spec.format]}"
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
                f"{spec.data} holds {_KINDS[spec.format]}"
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
            f"training {spec.name} on {spec.data} ({len(spec.texts)} {_KINDS[spec.format]}, "
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


_KINDS = {"text": "texts", "completion": "prompt/completion examples", "chat": "conversations"}
_COVERS = {"completion": "completions", "chat": "assistant turns"}


def _fields(args: argparse.Namespace) -> Fields:
    """The fields ``--prompt-field``, ``--completion-field`` and ``--messages-field`` name."""
    from ..data import Fields

    return Fields(
        prompt=getattr(args, "prompt_field", None),
        completion=getattr(args, "completion_field", None),
        messages=getattr(args, "messages_field", None),
        choices=getattr(args, "choices_field", None),
    )


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
        data, field = _data_and_field(source)
        if any(s.name == name for s in specs):
            raise UserError(f"--task {name!r} is given twice; each task needs its own name")
        specs.append(_TaskSpec(name, data, field or args.text_field, output / name))
    return specs


def _data_and_field(source: str) -> tuple[str, str | None]:
    """``DATA[:FIELD]``: the whole of ``source`` when it names data (a bundled set, an existing
    path), else split at its last colon when what follows looks like a field name."""
    from ..data import EXAMPLE_PREFIX, EXAMPLES

    if source.startswith(EXAMPLE_PREFIX):
        parts = source[len(EXAMPLE_PREFIX) :].split(":")
        if len(parts) >= 2 and parts[1] not in ("train", "heldout"):
            return EXAMPLE_PREFIX + ":".join(parts[:-1]), parts[-1]
        if len(parts) == 3:
            return EXAMPLE_PREFIX + ":".join(parts[:2]), parts[2]
        if parts[0] in EXAMPLES or len(parts) > 1:
            return source, None
    if Path(source).expanduser().exists():
        return source, None
    data, sep, field = source.rpartition(":")
    if sep and data and field and "/" not in field and "\\" not in field:
        return data, field
    return source, None


def _read_requests(path: str, names: list[str]) -> list[Any]:
    from ..generation import Request

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise UserError(f'{path}:{number}: expected {{"prompt": "...", "adapter": ...}}')
        adapter = item.get("adapter")
        if adapter is not None and adapter not in names:
            known = ", ".join(names) or "none loaded; pass --adapter DIR"
            raise UserError(f"{path}:{number}: unknown adapter {adapter!r} (adapters: {known})")
        seed = item.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UserError(f"{path}:{number}: seed must be an integer, not {seed!r}")
        requests.append(Request(prompt=item["prompt"], adapter=adapter, seed=seed))
    if not requests:
        raise UserError(f"{path} has no requests")
    return requests


def _generate_config(args: argparse.Namespace) -> Any:
    """The sampling parameters the generation flags give; a bad value names its flag."""
    from ..engine import RequestError, SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            seed=args.seed,
        )
    except RequestError as exc:
        if exc.field is None:
            raise
        raise UserError(exc.renamed("--" + exc.field.replace("_", "-"))) from exc


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation import Request

    config = _generate_config(args)
    if bool(args.prompt) == bool(args.requests):
        raise UserError("give --prompt (repeatable) or --requests FILE.jsonl, not both")
    _quiet()
    from ..generation import generate

    adapters = _read_adapters(args.adapter, args.allow_pickle)
    spm = _load_model(args)
    names = _add_adapters(spm, adapters)
    if args.requests:
        requests = _read_requests(args.requests, names)
    else:
        targets: list[str | None] = ([None] if args.with_base or not names else []) + names
        requests = [Request(p, a, chat=args.chat) for p in args.prompt for a in targets]
    completions = generate(
        spm,
        requests,
        config,
        batch_size=args.batch_size,
        progress=not args.json and len(requests) > args.batch_size,
    )
    for request, completion in zip(requests, completions, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": request.prompt,
                        "adapter": request.adapter,
                        "chat": request.chat,
                        "completion": completion,
                    }
                )
            )
        elif request.chat:
            print(
                f"[{request.adapter or 'base'}] user: {request.prompt}\nassistant: {completion}\n"
            )
        else:
            print(f"[{request.adapter or 'base'}] {request.prompt}{completion}\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _quiet()
    from ..data import load_texts
    from ..insight.evaluate import evaluate
    from ..rows import MAX_LENGTH_CAP

    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2):
        raise UserError("--batch-size must be at least 1 and --max-length at least 2")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    metrics = list(dict.fromkeys(args.metric or ["loss"]))
    choices = _task_options(args, metrics)
    datasets = [load_texts(d, args.text_field, args.max_samples, _fields(args)) for d in args.data]
    if any(m != "loss" for m in metrics) or args.few_shot or args.instruction:
        # Every figure is then about each row's answer: a conversation's last assistant turn.
        datasets = _task_datasets(datasets, metrics)
    runs = _eval_runs(args, datasets)  # per dataset: (context, examples) for the base model
    adapters = _read_adapters(args.adapter, args.allow_pickle)
    spm = _load_model(args)
    names = _add_adapters(spm, adapters)
    plan = _task_plan(datasets, runs, names)
    results = []
    if "loss" in metrics:
        for d, model, context, examples in plan:
            result = evaluate(spm, examples, model, d.source, args.batch_size, args.max_length)
            result.context = context
            results.append(result)
    tasks = _task_results(spm, args, metrics, plan, choices, args.batch_size)
    if args.json:
        print(json.dumps([r.as_dict() for r in [*results, *tasks]]))
        return 0
    from rich.console import Console
    from rich.table import Table

    if tasks:
        _print_task_results(tasks)
    if not results:
        return 0

    table = Table(title="mean loss per token (lower is better)")
    for column in ("data", "model", "loss", "perplexity", "tokens"):
        table.add_column(
            column, justify="right" if column in ("loss", "perplexity", "tokens") else "left"
        )
    for r in results:
        table.add_row(r.data, _shown(r), f"{r.loss:.3f}", f"{r.perplexity:.1f}", str(r.tokens))
    Console().print(table)
    for r in results:
        if r.adapter is None and r.cut:
            print(
                f"note: {r.cut} texts of {r.data} did not fit in --max-length "
                f"{args.max_length or MAX_LENGTH_CAP} "
                "(tokens, EOS included): they were cut and scored without an EOS"
            )
    return 0


def _task_options(args: argparse.Namespace, metrics: list[str]) -> list[str] | None:
    """Checks the task flags before anything is loaded; returns the ``--choices`` list."""
    from ..insight.scoring import compile_pattern

    if args.few_shot < 0:
        raise UserError("--few-shot must be 0 or more")
    choices = [c.strip() for c in args.choices.split(",")] if args.choices else None
    if choices is not None and (len(choices) < 2 or not all(choices)):
        raise UserError("--choices needs at least two non-empty candidates, comma-separated")
    if "pattern" in metrics:
        compile_pattern(args.pattern)
    elif args.pattern:
        raise UserError("--pattern is for --metric pattern")
    return choices


def _task_datasets(datasets: list[Any], metrics: list[str]) -> list[Any]:
    """``datasets`` as task rows (a conversation up to its last assistant turn, that turn the
    reference); plain texts are refused."""
    from dataclasses import replace

    from ..insight.scoring import task_rows

    out = []
    for d in datasets:
        if d.format == "text":
            asked = "--few-shot and --instruction" if set(metrics) <= {"loss"} else "task metrics"
            raise UserError(
                f"{asked} need prompt/completion or chat data; {d.source} holds plain texts"
            )
        out.append(replace(d, examples=task_rows(d.examples)))
    return out


def _task_plan(
    datasets: list[Any], runs: list[list[tuple[Any, Any]]], names: list[str]
) -> list[tuple[Any, str | None, str | None, Any]]:
    """Per dataset, ``(data, model, context, examples)``: the base model's runs, then each
    adapter's on the plain rows."""
    return [
        (d, model, context, examples)
        for d, contexts in zip(datasets, runs, strict=True)
        for model, context, examples in [
            *((None, c, e) for c, e in contexts),
            *((name, None, d.examples) for name in names),
        ]
    ]


def _eval_runs(args: argparse.Namespace, datasets: list[Any]) -> list[list[tuple[Any, Any]]]:
    """Per dataset, the base model's runs: ``(context, examples)``, zero-shot first, then with
    ``--instruction`` and ``--few-shot K`` shots (the baselines an adapter is judged against)."""
    from ..data import heldout_source, load_texts
    from ..insight.scoring import in_context, pick_shots, task_rows

    runs = []
    for d in datasets:
        contexts: list[tuple[Any, Any]] = [(None, d.examples)]
        if args.instruction:
            contexts.append(("instruction", in_context(d.examples, [], args.instruction)))
        if args.few_shot:
            source = args.shots_from or _training_part(d.source, heldout_source, args.adapter)
            shots_data = load_texts(source, None, None, _fields(args))
            if shots_data.format != d.format:
                raise UserError(
                    f"--shots-from {source} holds {_KINDS[shots_data.format]}, but {d.source} "
                    f"holds {_KINDS[d.format]}: shots must be in the data's own format"
                )
            pool = task_rows(shots_data.examples)
            held = set(d.examples)
            free = [e for e in pool if e not in held]  # a row is never its own shot
            if len(free) < args.few_shot:
                raise UserError(
                    f"--few-shot {args.few_shot} needs {args.few_shot} examples from {source} "
                    f"that are not evaluated rows; it has {len(free)}"
                )
            shots = pick_shots(free, args.few_shot)
            label = f"{args.few_shot}-shot"
            contexts.append((label, in_context(d.examples, shots, args.instruction)))
        runs.append(contexts)
    return runs


def _training_part(source: str, heldout_source: Any, adapter_folders: list[str]) -> str:
    """Where shots come from by default: the training part of a bundled held-out set, or the
    training data of an adapter that records ``source`` as its held-out data."""
    if source.endswith(":heldout") and heldout_source(source.removesuffix(":heldout")) == source:
        return source.removesuffix(":heldout")
    from ..insight.report import AdapterInfo

    for folder in adapter_folders:
        info = AdapterInfo.read(Path(folder).name, Path(folder))
        data = info.training.get("data")
        held = {info.training.get("eval_data"), info.heldout_source()}
        if (
            source in held
            and isinstance(data, str)
            and (data.startswith("examples:") or Path(data).exists())
        ):
            return data
    raise UserError(f"--few-shot on {source}: say where the shots come from with --shots-from")


def _task_results(
    spm: Any,
    args: argparse.Namespace,
    metrics: list[str],
    plan: list[tuple[Any, str | None, str | None, Any]],
    choices: list[str] | None,
    batch_size: int,
) -> list[Any]:
    from ..insight.scoring import choice_accuracy, exact_match, pattern_match

    out = []
    for metric in (m for m in metrics if m != "loss"):
        for d, model, context, examples in plan:
            if metric == "choice":
                result = choice_accuracy(spm, examples, model, d.source, choices, batch_size)
            elif metric == "pattern":
                result = pattern_match(
                    spm,
                    examples,
                    model,
                    args.pattern,
                    d.source,
                    args.max_new_tokens,
                    batch_size,
                )
            else:
                result = exact_match(
                    spm, examples, model, d.source, args.max_new_tokens, batch_size
                )
            result.context = context
            out.append(result)
    return out


def _shown(result: Any) -> str:
    """A result's model as a table shows it: ``base``, ``base (8-shot)``, or the adapter."""
    name = result.adapter or "base"
    return f"{name} ({result.context})" if result.context else name


def _print_task_results(tasks: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="task accuracy (higher is better)")
    for column in ("data", "model", "metric", "accuracy", "length-normalised", "rows"):
        table.add_column(
            column,
            justify="left" if column in ("data", "model", "metric") else "right",
            overflow="fold",  # a narrow terminal wraps a long dataset name, never cuts it
        )
    for t in tasks:
        norm = f"{t.accuracy_norm:.3f}" if t.accuracy_norm is not None else ""
        table.add_row(t.data, _shown(t), t.metric, f"{t.accuracy:.3f}", norm, str(t.n))
    Console().print(table)
    for t in tasks:
        if t.metric == "choice":
            labels = list(t.labels)
            matrix = Table(title=f"{_shown(t)} on {t.data}: gold (rows) vs chosen")
            matrix.add_column("gold")
            for label in labels:
                matrix.add_column(label, justify="right")
            for gold in labels:
                matrix.add_row(gold, *(str(t.labels[gold].get(p, 0)) for p in labels))
            Console().print(matrix)
        for miss in t.misses:
            print(
                f"miss ({_shown(t)}): {miss['prompt']!r} -> {miss['completion']!r}, "
                f"expected {miss['reference']!r}"
            )


def cmd_compare(args: argparse.Namespace) -> int:
    config = _generate_config(args)
    if not args.prompt:
        raise UserError("give at least one --prompt")
    if any(not p.strip() for p in args.prompt):
        raise UserError("a --prompt is empty; give some text")
    _quiet()
    from ..insight.compare import compare, print_tables, to_markdown

    adapters = _read_adapters(args.adapter, args.allow_pickle)
    spm = _load_model(args)
    names = _add_adapters(spm, adapters)
    comparisons = compare(spm, args.prompt, names, config)
    if args.json:
        print(json.dumps([c.as_dict() for c in comparisons]))
    elif args.markdown:
        print(to_markdown(comparisons))
    else:
        from rich.console import Console

        print_tables(comparisons, Console())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    from ..prompt import load_adapter

    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    _quiet()
    from ..insight.inspection import inspect_adapter

    spm = _load_model(args)
    spm.add_adapter(adapter)
    from rich.console import Console
    from rich.table import Table

    if adapter.method == "prefix":
        from ..insight.inspection import inspect_prefix

        deep = inspect_prefix(spm, adapter)
        if args.json:
            print(json.dumps(deep.as_dict()))
            return 0
        table = Table(
            title=f"{adapter.name}: prefix of {deep.virtual_tokens} virtual tokens; mean key and "
            "value norms per layer, against the model's own for real tokens"
        )
        for column in (
            "layer",
            "keys",
            "model's keys",
            "ratio",
            "values",
            "model's values",
            "ratio",
        ):
            table.add_column(column)
        for layer in deep.layers:
            table.add_row(
                str(layer.layer),
                f"{layer.key_norm:.2f}",
                f"{layer.model_key_norm:.2f}",
                f"{layer.key_norm / max(layer.model_key_norm, 1e-12):.2f}",
                f"{layer.value_norm:.2f}",
                f"{layer.model_value_norm:.2f}",
                f"{layer.value_norm / max(layer.model_value_norm, 1e-12):.2f}",
            )
        Console().print(table)
        return 0
    view = inspect_adapter(spm, adapter, args.top_k)
    if args.json:
        print(json.dumps(view.as_dict()))
        return 0

    table = Table(
        title=f"{adapter.name}: vocabulary row norms mean {view.vocab_norm_mean:.2f}, "
        f"std {view.vocab_norm_std:.2f}"
    )
    for column in ("#", "norm", "z", "pct", f"nearest {args.top_k} tokens (cosine)"):
        table.add_column(column)
    for t in view.tokens:
        near = ", ".join(f"{n.token!r} {n.cosine:.2f}" for n in t.nearest)
        table.add_row(
            str(t.index), f"{t.norm:.2f}", f"{t.norm_z:+.1f}", f"{t.norm_percentile:.0f}", near
        )
    Console().print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..insight.report import check_writable

    config = _generate_config(args)
    if args.max_length is not None and args.max_length < 2:
        raise UserError("--max-length must be at least 2")
    output = Path(args.output)
    check_writable(output, args.overwrite)
    if any(not p.strip() for p in args.prompt):
        raise UserError("a --prompt is empty; give some text")
    loaded = _read_adapters(args.adapter, args.allow_pickle)
    _quiet()
    from ..data import load_texts
    from ..insight.report import AdapterInfo, build_report, write_report
    from .demo import GUIDE_PROMPTS

    metrics = list(dict.fromkeys(args.metric or []))
    choices = _task_options(args, metrics)
    if (args.few_shot or args.instruction) and not metrics:
        raise UserError("--few-shot and --instruction are baselines for a --metric; give one")
    infos = [AdapterInfo.read(a.name, Path(f)) for a, f in zip(loaded, args.adapter, strict=True)]
    sources = args.data or list(dict.fromkeys(s for i in infos if (s := i.heldout_source())))
    if not sources:
        raise UserError("the adapters record no held-out data; give --data")
    datasets = [load_texts(d, args.text_field, args.max_samples, _fields(args)) for d in sources]
    task_data = _task_datasets(datasets, metrics) if metrics else []
    runs = _eval_runs(args, task_data)
    spm = _load_model(args)
    names = _add_adapters(spm, loaded)
    plan = _task_plan(task_data, runs, names)
    tasks = _task_results(spm, args, metrics, plan, choices, batch_size=16)
    html = build_report(
        spm,
        infos,
        datasets,
        args.prompt or GUIDE_PROMPTS,
        config,
        max_length=args.max_length,
        tasks=tasks,
    )
    write_report(html, output)
    print(f"report written to {output} ({len(html) // 1024} KiB)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..server.run import serve

    _quiet()
    return serve(
        args.model,
        args.device,
        args.dtype,
        args.adapters,
        args.host,
        args.port,
        args.api_key or None,
        args.max_batch_size,
        args.max_tokens_cap,
        args.poll_seconds,
        args.max_body_bytes,
        max_queue=args.max_queue,
        drain_seconds=args.drain_seconds,
        named=args.adapter,
        retune=args.retune,
        max_messages=args.max_messages,
        public_metrics=args.public_metrics,
    )


def cmd_embeds(args: argparse.Namespace) -> int:
    if not args.output and not args.base64:
        raise UserError("give --output FILE.pt, --base64, or both")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    if output is not None and not output.parent.is_dir():
        raise UserError(f"folder {output.parent} does not exist")
    adapters = _read_adapters([args.adapter], args.allow_pickle) if args.adapter else [None]
    if adapters[0] is not None and adapters[0].method == "prefix":
        raise UserError(
            f"{args.adapter} is a prefix (deep prompt) adapter: keys and values at every layer, "
            "which prompt_embeds (input rows) cannot carry; serve it with softprompt"
        )
    _quiet()
    from ..embeds import prompt_embeds, to_base64, to_bytes
    from ..files import write_bytes

    base = _load_base(args)
    try:
        tensor = prompt_embeds(base.model, base.tokenizer, adapters[0], args.prompt)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if output is not None:
        write_bytes(output, to_bytes(tensor))
        print(
            f"softprompt: wrote {tuple(tensor.shape)} {tensor.dtype} to {output}", file=sys.stderr
        )
    if args.base64:
        print(to_base64(tensor))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    from ..hub import ADAPTER_FILES
    from ..prompt import load_adapter

    folder = Path(args.adapter)
    load_adapter(folder, allow_pickle=args.allow_pickle)  # a folder that is not one fails here
    try:
        validate_repo_id(args.repo_id)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's validation error, any version
        raise UserError(f"{args.repo_id!r} is not a Hub repository id (owner/name): {exc}") from exc
    if "/" not in args.repo_id:
        raise UserError(f"{args.repo_id!r}: give the repository as owner/name")
    # what a Hub download fetches, when present (never the held-out data)
    files = [name for name in ADAPTER_FILES if (folder / name).is_file()]
    card = folder / "README.md"
    metadata = ModelCard.load(card).data.to_dict() if card.is_file() else {}
    message = args.commit_message or f"Upload {folder.name} with softprompt"
    if args.dry_run:
        where = f"{args.repo_id}@{args.revision or 'main'}"
        private = " (private)" if args.private else ""
        print(f"would upload to {where}{private}: {message!r}")
        for name in files:
            print(f"  {name}  {(folder / name).stat().st_size:,d} bytes")
        print("model card metadata:")
        print(json.dumps(metadata, indent=2))
        return 0
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=args.repo_id,
            revision=args.revision,
            commit_message=message,
            allow_patterns=files,
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not push to {args.repo_id}: {first}") from exc
    print(f"pushed {len(files)} files to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0
