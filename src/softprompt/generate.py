"""Batched generation where every row may carry a different adapter, or none.

One plain decode loop over a KV cache: prefill the left-padded batch with position ids from the
attention mask, then feed one token per row per step. Rows finish at EOS independently. The
repetition penalty looks only at real tokens of each row (never virtual ids, never padding), so a
row gives the same greedy output alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import pad_left
from .errors import UserError
from .prompt import SoftPromptModel


@dataclass
class GenerateConfig:
    """Decoding options, shared by every request of a call."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """Above 1 discourages tokens already in the prompt or output (CTRL-style, as transformers)."""
    seed: int = 0
    """Seed of every request that gives none of its own (sampling only)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise UserError("--temperature must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise UserError("--repetition-penalty must be positive")


@dataclass
class Request:
    """One prompt and the adapter (by loaded name) to run it with; None for the base model.

    ``seed`` (default: the config's) seeds this request's own generator, so a sampled completion
    depends only on the request itself, never on what it is batched with.
    """

    prompt: str
    adapter: str | None = None
    seed: int | None = None


def eos_ids(spm: SoftPromptModel) -> set[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's configured ones."""
    ids = set()
    if spm.tokenizer.eos_token_id is not None:
        ids.add(int(spm.tokenizer.eos_token_id))
    configured = getattr(spm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


@torch.no_grad()
def generate(
    spm: SoftPromptModel,
    requests: list[Request],
    config: GenerateConfig,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Completions for ``requests``, in their order. Rows are batched by length, mixing adapters."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    rows = [spm.encode(r.prompt, r.adapter) for r in requests]
    seeds = [config.seed if r.seed is None else r.seed for r in requests]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outputs: list[str] = [""] * len(rows)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        new_tokens = generate_ids(spm, [rows[i] for i in chunk], config, [seeds[i] for i in chunk])
        for i, ids in zip(chunk, new_tokens, strict=True):
            outputs[i] = str(spm.tokenizer.decode(ids, skip_special_tokens=True))
    return outputs


def generate_ids(
    spm: SoftPromptModel,
    rows: list[list[int]],
    config: GenerateConfig,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """New token ids for each row of token ids (virtual ids allowed), EOS excluded.

    ``seeds`` gives each row its own sampling generator (default: the config's seed for all).
    """
    if any(not row for row in rows):
        raise UserError("a prompt with no tokens cannot be completed; give some text")
    stop = eos_ids(spm)
    pad_id = spm.tokenizer.pad_token_id
    batch = pad_left(rows, pad_id)
    mask = batch["attention_mask"]
    vocab = spm.vocab_size
    seen = _seen_tokens(batch["input_ids"], mask, vocab) if config.repetition_penalty != 1 else None
    generators = None
    if config.temperature > 0:
        generators = [
            torch.Generator().manual_seed(seed) for seed in seeds or [config.seed] * len(rows)
        ]
    out = spm.forward(**batch, use_cache=True)
    cache = out.cache
    positions = batch["position_ids"][:, -1:]  # (B, 1)
    logits = out.logits[:, -1, :vocab].float()  # (B, V)
    done = torch.zeros(len(rows), dtype=torch.bool)
    produced: list[list[int]] = [[] for _ in rows]
    for step in range(config.max_new_tokens):
        token = _pick(logits, seen, config, generators)  # (B,)
        for i in range(len(rows)):
            if not done[i]:
                if int(token[i]) in stop:
                    done[i] = True
                else:
                    produced[i].append(int(token[i]))
        if bool(done.all()) or step == config.max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(len(rows)), token] = True
        token = token.masked_fill(done, pad_id).unsqueeze(1)  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions + 1
        out = spm.model(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        logits = out.logits[:, -1, :vocab].float()
    return produced


def _seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) bool: which real tokens each row's prompt holds; pads and virtual ids left out."""
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool)
    real = (mask == 1) & (ids < vocab)
    seen.scatter_(1, torch.where(real, ids, vocab), True)
    return seen[:, :vocab].contiguous()


def _pick(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    config: GenerateConfig,
    generators: list[torch.Generator] | None,
) -> torch.Tensor:
    """Next token per row from (B, V) logits; sampling draws row i from ``generators[i]``."""
    if seen is not None:
        penalised = torch.where(
            logits > 0, logits / config.repetition_penalty, logits * config.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    # These warpers only read the scores; the ids argument is unused, so none are passed.
    no_ids = torch.empty(0, dtype=torch.long)
    logits = TemperatureLogitsWarper(config.temperature)(no_ids, logits)
    if config.top_p < 1:
        logits = TopPLogitsWarper(config.top_p)(no_ids, logits)
    probs = logits.softmax(dim=-1).cpu()
    if generators is None or len(generators) != probs.shape[0]:
        raise ValueError("sampling needs one generator per row")
    picks = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    return torch.cat(picks).to(logits.device)
