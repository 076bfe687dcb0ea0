"""Completions for a list of requests, each with its own adapter or none, through the engine.

This is the batch front of ``engine``: the CLI's generate, compare, report and the demo all call
it, so there is one generation path. The engine is kept on the ``SoftPromptModel`` and follows
the adapters loaded in it (and their current rows, so a prompt trained in place is served as
trained).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .engine import Engine, EngineConfig, SamplingParams
from .errors import UserError
from .layout import chat_layout
from .prompt import SoftPromptModel


@dataclass
class Request:
    """One prompt and the adapter (by loaded name) to run it with; None for the base model.

    ``seed`` (default: the parameters') seeds this request's own generator, so a sampled
    completion depends only on the request itself, never on what it is batched with. With
    ``chat``, the prompt is one user message in the model's chat template, laid out as chat
    training and the server's chat endpoint lay it out (``layout.chat_layout``); ``messages``,
    if given, is the whole conversation so laid out (``prompt`` is then only its label).
    """

    prompt: str
    adapter: str | None = None
    seed: int | None = None
    chat: bool = False
    messages: tuple[tuple[str, str], ...] | None = None

    def tokens(self, tokenizer: Any) -> str | list[int]:
        """What the engine is given: the prompt text, or the chat layout's ids."""
        if self.messages is not None or self.chat:
            turns = self.messages if self.messages is not None else (("user", self.prompt),)
            return chat_layout(tokenizer, turns, add_generation_prompt=True).ids
        return self.prompt


def engine_for(spm: SoftPromptModel, batch_size: int = 32) -> Engine:
    """The engine serving ``spm``'s base model and exactly the adapters loaded in it now."""
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    engine: Engine | None = getattr(spm, "_engine", None)
    if engine is None or engine.config.max_batch_size != batch_size:
        engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_batch_size=batch_size))
        spm._engine = engine  # type: ignore[attr-defined]
    # Compared by identity, not name: an adapter removed and another added under its name is
    # served as the new one.
    served = {name: engine.registry.source(name) for name in engine.adapters()}
    for name, source in served.items():
        if spm.adapters.get(name) is not source:
            engine.remove_adapter(name)
    for name, adapter in spm.adapters.items():
        if served.get(name) is not adapter:
            engine.add_adapter(name, adapter)
    return engine


def generate(
    spm: SoftPromptModel,
    requests: list[Request],
    params: SamplingParams,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """Completion texts for ``requests``, in their order; all run together, mixing adapters.

    Raises:
        UserError: a request cannot run (unknown adapter, empty or too long prompt).
    """
    from tqdm.auto import tqdm

    engine = engine_for(spm, batch_size)
    handles = [
        engine.submit(
            r.tokens(spm.tokenizer),
            r.adapter,
            params if r.seed is None else replace(params, seed=r.seed),
        )
        for r in requests
    ]
    with tqdm(total=len(handles), desc="generating", unit="request", disable=not progress) as bar:
        while engine.has_work():
            engine.step()
            bar.n = sum(h.seq.finished for h in handles)
            bar.refresh()
    completions = [h.result() for h in handles]
    failed = next((c for c in completions if c.finish_reason == "error"), None)
    if failed is not None:
        raise UserError(f"generation failed: {failed.error}")
    return [c.text for c in completions]
