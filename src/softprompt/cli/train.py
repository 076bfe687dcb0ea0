"""``softprompt train``: parse the run's flags into a ``RunRequest``, let the library plan and
run it (``tuning.run``), and print what it decided and did.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .common import COVERS, data_and_field, fields_of, load_model, quiet

if TYPE_CHECKING:
    from ..tuning.config import TrainResult
    from ..tuning.run import RunRequest, TaskSource, TrainedTask, TrainingPlan


def cmd_train(args: argparse.Namespace) -> int:
    from ..tuning.distributed import launched, shutdown
    from ..tuning.run import plan_training, run_training

    request = _request(args)
    group = launched()
    if not group.main:
        args.json = True  # only rank 0 prints (and writes)
    quiet()
    plan = plan_training(request, lambda: load_model(args, group), group)
    if not args.json:
        _print_plan(plan)
    if group.active and group.main:  # with --json too, on stderr: stdout is the JSON
        batch = plan.config.batch_size
        print(
            f"data parallel over {group.world} processes: {batch} rows each, "
            f"{batch * group.world} a step",
            file=sys.stderr if args.json else sys.stdout,
        )
        if plan.weights_held is not None and not args.json:
            for rank, held in enumerate(plan.weights_held):
                print(
                    f"sharded: process {rank} holds {held['sharded'] / 2**20:,.1f} MiB of the "
                    f"decoder layers' weights and {held['whole'] / 2**20:,.1f} MiB whole "
                    "(the embedding table and the output head)"
                )
    with _sigterm_interrupts():
        trained = run_training(plan, progress=not args.json)
    shutdown(group)
    if group.main:
        _print_trained(args, plan, trained)
    return 0


def _request(args: argparse.Namespace) -> RunRequest:
    """``train``'s flags as a ``RunRequest``: the tasks and what the user asked; a setting not
    given stays None, for the library to decide from the data."""
    from ..tuning.config import TrainConfig
    from ..tuning.run import RunRequest

    config = TrainConfig(
        virtual_tokens=args.virtual_tokens,
        method=args.method,
        init=args.init,
        init_text=args.init_text,
        init_from=args.init_from,
        epochs=args.epochs,
        max_epochs=args.max_epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        heldout_fraction=args.heldout_fraction,
        compile=args.compile,
        warmup=args.warmup,
        schedule=args.schedule,
        group_by_length=args.group_by_length,
        eval_every=args.eval_every,
        patience=args.patience,
        keep=args.keep,
        checkpoint_every=args.checkpoint_every,
        reparam=args.reparam,
    )
    return RunRequest(
        tasks=_task_sources(args),
        config=config,
        output=Path(args.output),
        eval_data=args.eval_data,
        max_samples=args.max_samples,
        fields=fields_of(args),
        resume=args.resume,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        shard=args.shard,
        search=args.search,
    )


def _task_sources(args: argparse.Namespace) -> list[TaskSource]:
    """The prompts to train, from ``--data`` or each ``--task NAME=DATA[:FIELD]``."""
    from ..tuning.run import TaskSource

    output = Path(args.output)
    if not args.task:
        if not args.data:
            raise UserError("give --data DATA (one prompt) or --task NAME=DATA (repeatable)")
        name = output.expanduser().resolve().name
        return [TaskSource(name, args.data, output, args.text_field)]
    if args.data:
        raise UserError(
            "give --data (one prompt written to --output) or --task (one prompt per task, "
            "each in --output/NAME), not both"
        )
    if args.eval_data:
        raise UserError(
            "--eval-data goes with --data; with --task each task is held out from its own data "
            "(the bundled held-out part for examples:, else --heldout-fraction of it)"
        )
    sources = []
    for item in args.task:
        name, sep, source = item.partition("=")
        name = name.strip()
        if not sep or not name or not source:
            raise UserError(f"--task {item!r}: expected NAME=DATA or NAME=DATA:FIELD")
        data, field = data_and_field(source)
        try:
            sources.append(TaskSource(name, data, output / name, field or args.text_field))
        except UserError as exc:
            raise UserError(f"--task {item!r}: {exc}") from None
    return sources


def _print_plan(plan: TrainingPlan) -> None:
    """The settings the data decided, what the loss covers, and each task's data."""
    from ..data import KINDS
    from ..tuning.config import DEFAULT_EPOCHS, HELDOUT_FILE, MIN_TASK_STEPS, is_task_data

    config, tasks = plan.config, plan.tasks
    asked = plan.request.config
    data = (
        "prompt/completion or chat data"
        if is_task_data([t.format for t in tasks])
        else "plain text"
    )
    method = "prefix tuning" if config.method == "prefix" else "prompt tuning"
    methods = {c.method for c in plan.trials}
    if plan.trials:
        what = "method and learning rate" if len(methods) > 1 else "learning rate"
        print(
            f"{what}: chosen on the data by a search over {len(plan.trials)} candidates "
            f"({', '.join(c.label for c in plan.trials)}); --no-search trains {method} at lr "
            f"{config.lr:g} at once, --method and --lr pin them"
        )
    if len(methods) <= 1 and (
        asked.method is None or (config.method == "prompt" and asked.reparam is None)
    ):
        how = method
        if config.method == "prompt" and config.reparam != "none":
            how += f" through a {config.reparam} MLP"
        why = (
            f"{asked.init_from}'s"
            if asked.method is None and asked.init_from
            else f"the default for {data}"
        )
        print(f"method: {how} ({why}; --method and --reparam choose)")
    if asked.lr is None and not plan.trials:
        print(
            f"learning rate: {config.lr:g} (the default of {method} on {data}; --lr sets another)"
        )
    more = (
        f", and on while the held-out loss improves, up to {config.max_epochs} "
        "(--max-epochs sets the cap)"
        if config.max_epochs > config.epochs
        else ""
    )
    if asked.epochs is None and config.epochs != DEFAULT_EPOCHS:
        rows = sum(len(t.texts) for t in tasks)
        print(
            f"epochs: {config.epochs}, for at least {MIN_TASK_STEPS} steps on {rows} training "
            f"rows ({DEFAULT_EPOCHS} on a larger set; --epochs sets another){more}"
        )
    elif more:
        print(f"epochs: {config.epochs}{more}")
    if plan.length_fitted:
        why = (
            "the cap; longer texts are cut, --max-length sets another"
            if plan.length_capped
            else "the longest training text's, EOS included"
        )
        print(f"max length: {config.max_length} text tokens ({why})")
    for task, scored, total in plan.coverage():
        print(
            f"scoring {COVERS[task.format]}"
            + (f" of {task.name}" if len(tasks) > 1 else "")
            + f": {scored:,} of {total:,} tokens"
        )
    for task in tasks:
        print(
            f"training {task.name} on {task.source.data} ({len(task.texts)} "
            f"{KINDS[task.format]}, field {task.field!r}); held out: {len(task.eval_texts)}"
            + (
                f" from {task.eval_source}"
                if task.split is None
                else f" of {task.source.data}, kept in {task.output / HELDOUT_FILE}"
            )
        )
    if len(tasks) > 1:
        print(f"{len(tasks)} prompts in one run, their rows sharing batches")


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a launcher stopping the run because another process of it failed, or a job
    scheduler) ends training like Ctrl-C: with a message, not silently."""
    import signal

    def stopped(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_trained(
    args: argparse.Namespace, plan: TrainingPlan, trained: list[TrainedTask]
) -> None:
    """What the run did: JSON summaries (``--json``), or lines for a person."""
    from ..tuning.train import trainable_summary

    first = trained[0].result
    several = len(trained) > 1
    if args.json:
        summaries = [_summary(t) | _searched(plan) for t in trained]
        print(json.dumps({"tasks": summaries} if args.task else summaries[0]))
        return
    if first.resumed_from is not None:
        print(f"resumed at step {first.resumed_from} from {plan.checkpoints}")
    for item in trained:
        if item.result.texts_cut:
            print(
                f"note: {item.result.texts_cut} of {len(item.task.texts)} training texts"
                + (f" of {item.task.name}" if several else "")
                + f" did not fit in --max-length {plan.config.max_length} (tokens, EOS "
                "included): they were cut and trained without an EOS"
            )
    if plan.search_line:
        print(plan.search_line)
    print(trainable_summary(first.trainable_params, first.total_params))
    for item in trained:
        result, output = item.result, item.task.output
        print(
            (f"{item.task.name}: " if several else "")
            + f"held-out loss {result.loss_before:.3f} -> {result.loss_after:.3f} "
            f"(kept: step {result.best_step}{_judged(result)}"
            + (", stopped early" if result.stopped_early else "")
            + (
                f", {result.epochs_trained} epochs: the held-out loss was still improving"
                if result.config is not None and result.epochs_trained > result.config.epochs
                else ""
            )
            + f"); {result.seconds:.0f} s; saved to {output} (loss plot: {output / 'loss.png'})"
        )


def _searched(plan: TrainingPlan) -> dict[str, Any]:
    """The search's record for ``--json`` (nothing when the run did not search)."""
    return {"search": plan.record["search"]} if plan.record is not None else {}


def _judged(result: TrainResult) -> str:
    """How the kept rows were chosen, when by more than held-out loss."""
    if result.kept_by == "held-out loss":
        return ""
    scores = [e["metric"] for e in result.evals if e["step"] == result.best_step and "metric" in e]
    return f", by {result.kept_by}" + (f" {scores[-1]:.2f}" if scores else "")


def _summary(item: TrainedTask) -> dict[str, Any]:
    result = item.result
    return {
        "adapter": str(item.task.output),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "heldout_loss_before": result.loss_before,
        "heldout_loss_after": result.loss_after,
        "seconds": result.seconds,
        "texts_cut": result.texts_cut,
        "samples_per_second": result.samples / max(result.seconds, 1e-9),
        "best_step": result.best_step,
        "epochs": result.config.epochs if result.config is not None else None,
        "epochs_trained": result.epochs_trained,
        "kept_by": result.kept_by,
        "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from,
    }


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
