"""Starting rows for a new prompt (``init_prompt``) or a new deep prompt (``init_prefix``):
from vocabulary rows, a text, the label words, random draws, or an existing adapter."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import UserError
from ..prefix import PrefixShape, join, model_kv

if TYPE_CHECKING:
    from ..models import BaseModel


def init_prompt(
    base: BaseModel,
    num_virtual_tokens: int,
    how: str | None = "vocab",
    text: str | None = None,
    seed: int = 0,
    labels: list[str] | None = None,
) -> torch.Tensor:
    """Initial rows ``(num_virtual_tokens, hidden)`` for a new prompt (``how`` None: vocab, as
    a ``TrainConfig`` that leaves ``init`` to be decided resolves it without ``init_from``).

    ``labels`` (Lester et al. 2021, section 3.2, "class label" initialisation, for
    classification): one row per label, the mean of its tokens' rows, in order; rows beyond the
    labels are sampled from the vocabulary as ``vocab`` does, and with fewer rows than labels the
    first labels are used.

    ``vocab`` copies randomly chosen vocabulary rows (PEFT's SAMPLE_VOCAB); ``text`` copies the rows
    of ``text``'s tokens, repeated or cut to length (PEFT's TEXT); ``random`` draws Gaussian rows
    scaled so their expected norm equals the mean norm of the vocabulary rows. Llama-family models
    do not normalise input embeddings, so an unscaled N(0, 1) row (norm ~ sqrt(hidden)) swamps them.

    The rows are float32 on the CPU whatever the model's device and dtype, and the random draws
    come from a CPU generator, so a seed gives the same start on every device.
    """
    embedding: nn.Module = base.model.get_input_embeddings()
    weight = torch.as_tensor(embedding.weight).detach()  # (V, D), on the model's device

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        """Rows as the model's embedding module gives them (Gemma's scales them by
        sqrt(hidden) as it looks them up: a start must reach the model as tokens would)."""
        with torch.no_grad():
            return embedding(ids.to(weight.device)).detach()

    gen = torch.Generator().manual_seed(seed)
    how = how or "vocab"
    if how == "vocab":
        if num_virtual_tokens > weight.shape[0]:
            raise UserError(
                f"--init vocab samples distinct vocabulary rows: {num_virtual_tokens} virtual "
                f"tokens is more than the {weight.shape[0]} the vocabulary has"
            )
        rows = torch.randperm(weight.shape[0], generator=gen)[:num_virtual_tokens]
        return lookup(rows).float().cpu()
    if how == "text":
        if not text or not text.strip():
            raise UserError("--init text needs a non-empty --init-text")
        ids: list[int] = list(base.tokenizer(text)["input_ids"])
        if not ids:
            raise UserError(f"--init-text {text!r} gives no tokens")
        ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
        return lookup(torch.tensor(ids)).float().cpu()
    if how == "labels":
        if not labels:
            raise UserError("--init labels needs prompt/completion data (its completions)")
        means = []
        for label in labels[:num_virtual_tokens]:
            ids = list(base.tokenizer(label, add_special_tokens=False)["input_ids"])
            if not ids:
                raise UserError(f"the label {label!r} gives no tokens")
            means.append(lookup(torch.tensor(ids)).float().mean(dim=0))
        rows = torch.stack(means).cpu()
        if len(rows) < num_virtual_tokens:
            rest = init_prompt(base, num_virtual_tokens - len(rows), "vocab", seed=seed)
            rows = torch.cat([rows, rest])
        return rows
    if how == "random":
        scale = float(getattr(embedding, "scalar_embed_scale", None) or 1.0)
        mean_norm = float(weight.float().norm(dim=1).mean()) * scale
        rows = torch.randn(num_virtual_tokens, weight.shape[1], generator=gen)
        return rows * (mean_norm / math.sqrt(weight.shape[1]))
    raise UserError(f"unknown init {how!r}: use vocab, text, labels, random or file")


def init_prefix(
    base: Any,
    num_virtual_tokens: int,
    how: str | None = "vocab",
    text: str | None = None,
    seed: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """A starting prefix (PEFT tensor, float32 on the CPU) for ``base`` (``how`` None: vocab).

    ``vocab``: the keys/values the model computes for ``num_virtual_tokens`` sampled vocabulary
    tokens; ``text``: for the tokens of ``text`` (repeated or cut to length); ``random``:
    Gaussian, each layer's keys and values scaled to the spread of that layer's real ones (those
    of ``vocab``); ``file``: the keys/values of a prompt adapter's ``rows`` (deepening it);
    ``labels``: the keys/values of ``rows`` made by ``init_prompt``'s ``labels``.
    """
    model = base.model
    shape = PrefixShape.of(model)
    how = how or "vocab"
    if how in ("file", "labels"):
        if rows is None:
            raise UserError(
                f"--init {how} needs " + ("--init-from ADAPTER" if how == "file" else "its rows")
            )
        start = rows.float()
    else:
        start = init_prompt(
            base, num_virtual_tokens, "vocab" if how == "random" else how, text, seed
        )
    keys, values = model_kv(model, start)
    if how == "random":
        gen = torch.Generator().manual_seed(seed)
        keys = torch.randn(keys.shape, generator=gen) * keys.std(dim=(1, 2, 3), keepdim=True)
        values = torch.randn(values.shape, generator=gen) * values.std(dim=(1, 2, 3), keepdim=True)
    prefix = join(keys, values)
    assert prefix.shape[1] == shape.width
    return prefix
