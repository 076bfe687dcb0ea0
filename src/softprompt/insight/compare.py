"""Base model and adapters side by side on the same prompts, for people and programs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import SamplingParams
from ..errors import UserError
from ..generation import Request, generate
from ..prompt import SoftPromptModel

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Comparison:
    """One prompt and each model's completion of it; model None is the base model."""

    prompt: str
    completions: dict[str | None, str]

    def as_dict(self) -> dict[str, object]:
        return {
            "prompt": self.prompt,
            "completions": [{"adapter": a, "completion": c} for a, c in self.completions.items()],
        }


def compare(
    spm: SoftPromptModel,
    prompts: list[str],
    adapters: list[str],
    params: SamplingParams,
) -> list[Comparison]:
    """Complete every prompt with the base model and each adapter.

    Every row (each prompt with the base model and with each adapter) runs in one mixed batch.

    Raises:
        UserError: no prompts, or an empty prompt.
    """
    if not prompts:
        raise UserError("give at least one --prompt")
    if any(not p.strip() for p in prompts):
        raise UserError("a --prompt is empty; give some text")
    targets: list[str | None] = [None, *adapters]
    requests = [Request(prompt, t) for prompt in prompts for t in targets]
    outputs = iter(generate(spm, requests, params))
    return [Comparison(p, {t: next(outputs) for t in targets}) for p in prompts]


def to_markdown(comparisons: list[Comparison]) -> str:
    """A Markdown table per prompt, ready to paste into a model card."""
    out = []
    for c in comparisons:
        out.append(f"**Prompt:** {_cell(c.prompt)}\n")
        out.append("| model | completion |")
        out.append("|---|---|")
        for adapter, completion in c.completions.items():
            out.append(f"| {adapter or 'base model'} | {_cell(completion)} |")
        out.append("")
    return "\n".join(out)


def print_tables(comparisons: list[Comparison], console: Console) -> None:
    """One terminal table per prompt: a row per model with its completion."""
    from rich.table import Table

    for c in comparisons:
        table = Table(title=repr(c.prompt), title_justify="left", show_lines=True)
        table.add_column("model", style="bold", no_wrap=True)
        table.add_column("completion")
        for adapter, completion in c.completions.items():
            table.add_row(adapter or "base model", completion.strip())
        console.print(table)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"
