"""The input a prompt-embeds server needs to serve an adapter: its rows, then the prompt's.

vLLM (V1) has no prompt adapters, but takes ``prompt_embeds`` per request: a ``(T, D)`` tensor
fed to the model in place of token embeddings. A soft prompt is exactly that with the adapter's
rows first, so a vLLM fleet can serve softprompt adapters when each request carries this tensor
(its OpenAI server takes it base64-encoded from ``torch.save``).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch

from .adapters import Adapter, hidden_size_mismatch


@torch.no_grad()
def prompt_embeds(model: Any, tokenizer: Any, adapter: Adapter | None, prompt: str) -> torch.Tensor:
    """``(n + T, D)``: the adapter's n rows, then the T token embeddings of ``prompt``.

    The prompt is tokenised as softprompt's engine does; the tensor is on the model's device, in
    its dtype. Feeding it as ``inputs_embeds`` to the untouched base model gives the same output
    as softprompt serving the adapter.
    """
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise ValueError("the prompt is empty")
    text = embedding(torch.tensor(ids, device=weight.device))
    if adapter is None:
        return text
    if adapter.method == "prefix":
        raise ValueError(
            f"{adapter.name} is a prefix (deep prompt) adapter: keys and values at every layer, "
            "which prompt_embeds (input rows) cannot carry; serve it with softprompt"
        )
    problem = hidden_size_mismatch(adapter, int(weight.shape[1]))
    if problem:
        raise ValueError(problem)
    rows = adapter.weights.detach().to(device=weight.device, dtype=weight.dtype)
    return torch.cat([rows, text])


def to_bytes(tensor: torch.Tensor) -> bytes:
    """``torch.save`` of ``tensor``, moved to the CPU (what a ``.pt`` file holds)."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return buffer.getvalue()


def to_base64(tensor: torch.Tensor) -> str:
    """``tensor`` as vLLM's OpenAI server takes ``prompt_embeds``: base64 of ``torch.save``."""
    return base64.b64encode(to_bytes(tensor)).decode("ascii")
