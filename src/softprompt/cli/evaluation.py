"""``softprompt eval``, ``inspect`` and ``report``: held-out loss and task scores, what an
adapter's rows look like, and the report page.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .common import (
    add_adapters,
    fields_of,
    generate_config,
    load_model,
    quiet,
    read_adapters,
)

if TYPE_CHECKING:
    pass


def cmd_eval(args: argparse.Namespace) -> int:
    quiet()
    from ..data import load_texts
    from ..insight.evaluate import evaluate
    from ..rows import MAX_LENGTH_CAP

    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2):
        raise UserError("--batch-size must be at least 1 and --max-length at least 2")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    metrics = list(dict.fromkeys(args.metric or ["loss"]))
    choices = _task_options(args, metrics)
    datasets = [
        load_texts(d, args.text_field, args.max_samples, fields_of(args)) for d in args.data
    ]
    if any(m != "loss" for m in metrics) or args.few_shot or args.instruction:
        # Every figure is then about each row's answer: a conversation's last assistant turn.
        datasets = _task_datasets(datasets, metrics)
    runs = _eval_runs(args, datasets)  # per dataset: (context, examples) for the base model
    adapters = read_adapters(args.adapter, args.allow_pickle)
    if args.ensemble and (len(adapters) < 2 or metrics != ["choice"]):
        raise UserError(
            "--ensemble scores --metric choice alone, with two or more --adapter prompts"
        )
    spm = load_model(args)
    names = add_adapters(spm, adapters)
    ensemble = names if args.ensemble else None
    plan = _task_plan(datasets, runs, names)
    results = []
    if "loss" in metrics:
        for d, model, context, examples in plan:
            result = evaluate(spm, examples, model, d.source, args.batch_size, args.max_length)
            result.context = context
            results.append(result)
    tasks = _task_results(spm, args, metrics, plan, choices, args.batch_size, ensemble)
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
    from ..data import KINDS, heldout_source, load_texts
    from ..insight.scoring import in_context, pick_shots, task_rows

    runs = []
    for d in datasets:
        contexts: list[tuple[Any, Any]] = [(None, d.examples)]
        if args.instruction:
            contexts.append(("instruction", in_context(d.examples, [], args.instruction)))
        if args.few_shot:
            source = args.shots_from or _training_part(d.source, heldout_source, args.adapter)
            shots_data = load_texts(source, None, None, fields_of(args))
            if shots_data.format != d.format:
                raise UserError(
                    f"--shots-from {source} holds {KINDS[shots_data.format]}, but {d.source} "
                    f"holds {KINDS[d.format]}: shots must be in the data's own format"
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
    ensemble: list[str] | None = None,
) -> list[Any]:
    """Each task metric's result per planned run; with ``ensemble``, the ensemble of those
    adapters after its last member (``--metric choice``): every member's candidates scored
    once, its own result and the ensemble's taken from the same log-likelihoods."""
    from ..insight.scoring import choice_accuracy, choice_scores, exact_match, pattern_match

    out = []
    scored: dict[int, Any] = {}  # per dataset: the ensemble members' log-likelihoods
    for metric in (m for m in metrics if m != "loss"):
        for d, model, context, examples in plan:
            if metric == "choice" and ensemble and context is None and model in ensemble:
                if id(d) not in scored:
                    scored[id(d)] = choice_scores(
                        spm, examples, ensemble, d.source, choices, batch_size
                    )
                result = scored[id(d)].result([ensemble.index(model)], d.source)
                if model == ensemble[-1]:
                    out.append(result)  # the last member alone, then the ensemble
                    result = scored[id(d)].result(data_name=d.source)
            elif metric == "choice":
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


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    from ..adapters import load_adapter

    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    quiet()
    from ..insight.inspection import inspect_adapter

    spm = load_model(args)
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

    config = generate_config(args)
    if args.max_length is not None and args.max_length < 2:
        raise UserError("--max-length must be at least 2")
    output = Path(args.output)
    check_writable(output, args.overwrite)
    if any(not p.strip() for p in args.prompt):
        raise UserError("a --prompt is empty; give some text")
    loaded = read_adapters(args.adapter, args.allow_pickle)
    quiet()
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
    datasets = [load_texts(d, args.text_field, args.max_samples, fields_of(args)) for d in sources]
    task_data = _task_datasets(datasets, metrics) if metrics else []
    runs = _eval_runs(args, task_data)
    spm = load_model(args)
    names = add_adapters(spm, loaded)
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
