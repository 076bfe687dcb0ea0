"""Mean per-token loss and perplexity of the base model and of adapters on examples.

Each example is tokenised as in training (``layout``: ``[virtual][text][eos]`` for a text, the
EOS only where the text really ends; prompt/completion and chat examples are scored on their
completions and assistant turns only). The first text token is not scored for anyone: the base
model has no context to predict it from, so scoring it for adapters only would flatter them.
Every model is thus scored on exactly the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import Example
from ..errors import UserError
from ..prompt import SoftPromptModel
from ..rows import batch_loss, fitting_length, training_rows


@dataclass
class EvalResult:
    """Loss summed and counted over scored tokens; ``loss`` is their mean (nats per token)."""

    adapter: str | None
    data: str
    loss: float
    tokens: int
    cut: int = 0
    """Texts longer than ``max_length``, cut (and scored without an EOS)."""
    n: int = 0
    """Examples evaluated."""
    context: str | None = None
    """What stood before each prompt for a baseline (``instruction``, ``8-shot``); None: none."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def as_dict(self) -> dict[str, object]:
        return {
            "adapter": self.adapter,
            "data": self.data,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "texts_cut": self.cut,
            "metric": "loss",
            "n": self.n,
            "context": self.context,
        }


@torch.no_grad()
def evaluate(
    spm: SoftPromptModel,
    texts: Sequence[str | Example],
    adapter: str | None,
    data_name: str = "",
    batch_size: int = 8,
    max_length: int | None = None,
) -> EvalResult:
    """Mean per-token loss of ``adapter`` (None: the base model) on ``texts``.

    ``max_length`` (text tokens, EOS included) defaults to what the longest text needs, up to
    ``MAX_LENGTH_CAP``; longer texts are cut and counted in the result's ``cut``.

    Raises:
        UserError: no token would be scored (no texts, or none with a token after the first).
    """
    if max_length is None:
        max_length = fitting_length(spm, texts)
    rows, cut = training_rows(spm, texts, adapter, max_length)
    # Sorting by length keeps padding, and so wasted work, small.
    rows.sort(key=lambda r: len(r[0]))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        loss, n = batch_loss(spm, rows[start : start + batch_size], skip_first=True)
        total += float(loss)
        count += n
    if count == 0:
        raise UserError(
            f"nothing to score in {data_name or 'the evaluation texts'}: "
            f"{len(texts)} texts, none with a token after its first"
        )
    return EvalResult(
        adapter=adapter, data=data_name, loss=total / count, tokens=count, cut=cut, n=len(texts)
    )
