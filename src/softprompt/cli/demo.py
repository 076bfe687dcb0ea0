"""The PEFT prompt-tuning guide, done right and offline, as one command.

Two soft prompts (role-play prompts; inspirational quotes) are trained from one base model,
saved, loaded together into a fresh copy of the base model, and compared with it side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..adapters import load_adapter
from ..data import load_texts
from ..device import resolve
from ..engine import SamplingParams
from ..errors import UserError
from ..files import check_output, write_text
from ..generation import Request, generate
from ..insight.compare import compare, print_tables
from ..insight.report import AdapterInfo, build_report, eval_matrix, is_report, write_report
from ..models import load_base_model
from ..prompt import SoftPromptModel
from ..tuning.config import TrainConfig
from ..tuning.init import init_prompt
from ..tuning.save import save_trained
from ..tuning.train import train, trainable_summary

GUIDE_PROMPTS = [
    "I want you to act as a motivational coach. ",
    "There are two nice things that should matter to you:",
]
# (adapter name, bundled data, training budget sized to keep the demo within 5 minutes on 2 cores)
# (plain texts: resolved as such, with every default decided here)
TASKS = [
    (
        "role-prompts",
        "examples:role-prompts",
        TrainConfig(epochs=2, lr=6e-2, max_length=56).resolve(["text"]),
    ),
    ("quotes", "examples:quotes", TrainConfig(epochs=2, lr=6e-2, max_length=64).resolve(["text"])),
]
GENERATION = SamplingParams(max_new_tokens=40, repetition_penalty=1.5)
SUMMARY = "summary.json"
WRITTEN_BY = "softprompt demo"
"""Recorded in the summary, so a later demo knows the folder's contents are its own to replace."""


def check_demo_output(output: Path, overwrite: bool = False) -> None:
    """Fail before any work when the demo could not write ``output`` or would replace a user's.

    The demo writes ``role-prompts/``, ``quotes/``, ``report.html`` and ``summary.json`` into
    ``output``. It replaces them only when an earlier demo wrote them (its ``summary.json``
    says so), or with ``overwrite``; even then it replaces only adapter folders and reports.

    Raises:
        UserError: one of those exists and was not written by the demo (without ``overwrite``),
            or cannot be written.
    """
    entries = [name for name, _, _ in TASKS] + ["report.html", SUMMARY]
    present = [e for e in entries if (output / e).exists() or (output / e).is_symlink()]
    if present and not overwrite and not is_demo_output(output):
        raise UserError(
            f"{output} already holds {', '.join(present)}, not written by an earlier softprompt "
            "demo; pass --overwrite to replace them, or choose another --output"
        )
    for name, _, _ in TASKS:
        check_output(output / name, overwrite=True, what="the demo")
    report = output / "report.html"
    if report.exists() and not is_report(report):
        raise UserError(
            f"{report} is not a softprompt report; move it away or choose another --output"
        )
    if (output / SUMMARY).exists() and not (output / SUMMARY).is_file():
        raise UserError(f"{output / SUMMARY} is not a file; choose another --output")


def is_demo_output(output: Path) -> bool:
    """Whether ``output`` holds an earlier demo's results (its summary.json says so)."""
    try:
        summary = json.loads((output / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict):
        return False
    if summary.get("written_by") == WRITTEN_BY:
        return True
    # Summaries of demos before the written_by field: the demo's keys and adapters exactly.
    adapters = summary.get("adapters")
    return (
        isinstance(summary.get("base_checksum"), str)
        and isinstance(adapters, dict)
        and set(adapters) == {name for name, _, _ in TASKS}
    )


def run_demo(
    output: Path,
    model: str | None = None,
    console: Console | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Run the whole guide and print each stage; adapters go to ``output/<name>``.

    Raises:
        UserError: ``output`` holds things an earlier demo did not write (see
            ``check_demo_output``), or a model or file cannot be read or written.
    """
    console = console or Console()
    started = time.perf_counter()
    check_demo_output(output, overwrite)  # now, not after training
    where, precision = resolve(device, dtype)

    _stage(console, "1. The base model", started)
    base = load_base_model(model, dtype=precision, device=where)
    spm = SoftPromptModel(base)
    checksum = spm.base_checksum()
    total = sum(p.numel() for p in base.model.parameters())
    console.print(f"{base.name}: {total:,d} parameters, hidden size {spm.hidden_size}")
    base_answers = generate(spm, [Request(p) for p in GUIDE_PROMPTS], GENERATION)
    for prompt, answer in zip(GUIDE_PROMPTS, base_answers, strict=True):
        console.print(f"[dim]{prompt}[/dim]{answer}")

    _stage(console, "2. Train two soft prompts from the same base model", started)
    results = {}
    for name, data, config in TASKS:
        texts = load_texts(data).texts
        held = load_texts(data + ":heldout").texts
        console.print(
            f"[bold]{name}[/bold]: {len(texts)} texts from {data}, "
            f"{len(held)} held out; {config.virtual_tokens} virtual tokens "
            f"({config.init} init), {config.epochs} epochs, lr {config.lr}"
        )
        start = init_prompt(base, config.virtual_tokens, config.init, seed=config.seed)
        result = train(spm, name, start, texts, held, config)
        console.print(trainable_summary(result.trainable_params, result.total_params))
        folder = save_trained(
            spm,
            name,
            output / name,
            config,
            result,
            {"data": data, "eval_data": data + ":heldout"},
            overwrite=True,
        )
        console.print(
            f"saved {folder} (loss curve: {folder / 'loss.png'}); "
            f"{result.samples / result.seconds:.1f} samples/s"
        )
        results[name] = result
        if result.base_checksum_after != checksum:
            raise AssertionError("training changed the base model's weights")

    # Measured on the model that did the training, not on a new load of the same file.
    trained_checksum = spm.base_checksum()

    _stage(console, "3. Load both adapters into one fresh base model", started)
    fresh = SoftPromptModel(load_base_model(model, dtype=precision, device=where))
    for name, _, _ in TASKS:
        adapter = load_adapter(output / name)
        fresh.add_adapter(adapter)
        console.print(
            f"loaded {output / name}: {adapter.num_virtual_tokens} virtual tokens, "
            f"ids {fresh.virtual_ids(name)[0]}..{fresh.virtual_ids(name)[-1]}"
        )
    same = "unchanged" if trained_checksum == checksum else "CHANGED"
    console.print(
        f"base weights after training both prompts: {same} (sha256 {checksum[:16]}... before, "
        f"{trained_checksum[:16]}... after)"
    )

    _stage(console, "4. Base vs tuned, the rows of each prompt in one mixed batch", started)
    names = [name for name, _, _ in TASKS]
    comparisons = compare(fresh, GUIDE_PROMPTS, names, GENERATION)
    print_tables(comparisons, console)

    _stage(console, "5. Held-out loss (nats/token, lower is better)", started)
    held_out = [load_texts(data + ":heldout") for _, data, _ in TASKS]
    max_length = max(config.max_length for _, _, config in TASKS)
    matrix = eval_matrix(fresh, names, held_out, max_length)
    losses = Table()
    for column in ("adapter", "held-out data", "base model", "before training", "after", "tokens"):
        losses.add_column(column)
    summary: dict[str, Any] = {
        "written_by": WRITTEN_BY,
        "base_model": base.name,
        "base_checksum": checksum,
        "base_checksum_after_training": trained_checksum,
        "base_unchanged": same == "unchanged",
        "adapters": {},
    }
    for k, name in enumerate(names):
        result = results[name]
        base_loss, after = matrix[0][k], matrix[k + 1][k]
        summary["adapters"][name] = {
            "heldout": held_out[k].source,
            "base_loss": base_loss.loss,
            "loss_before": result.loss_before,
            "loss_after": after.loss,
            "tokens": after.tokens,
            "train_seconds": result.seconds,
            "samples_per_second": result.samples / result.seconds,
        }
        losses.add_row(
            name,
            held_out[k].source,
            f"{base_loss.loss:.3f}",
            f"{result.loss_before:.3f}",
            f"[bold]{after.loss:.3f}[/bold]",
            str(after.tokens),
        )
    console.print(losses)
    console.print(
        "(before training: the initial prompt rows, vocabulary samples; all columns "
        "score the same tokens)"
    )

    _stage(console, "6. Report", started)
    infos = [AdapterInfo.read(name, output / name) for name in names]
    html = build_report(
        fresh,
        infos,
        held_out,
        GUIDE_PROMPTS,
        GENERATION,
        max_length=max_length,
        matrix=matrix,
        comparisons=comparisons,
    )
    write_report(html, output / "report.html")
    console.print(f"report: {output / 'report.html'} (open it in a browser)")

    summary["completions"] = [c.as_dict() for c in comparisons]
    summary["seconds"] = time.perf_counter() - started
    write_text(output / SUMMARY, json.dumps(summary, indent=2) + "\n")
    console.print(
        f"demo finished in {summary['seconds']:.0f} s; adapters, report.html and "
        f"summary.json in {output}"
    )


def _stage(console: Console, title: str, started: float) -> None:
    console.rule(f"[bold]{title}[/bold] [dim]({time.perf_counter() - started:.0f} s)")
