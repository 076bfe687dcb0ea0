"""Deep prompts (prefix tuning, Li & Liang 2021, arXiv:2101.00190): trained keys and values at
every layer of the frozen model, instead of input rows only.

A prefix adapter of n virtual tokens holds, for each of the model's L layers, n keys and n values
of ``kv_heads x head_dim`` each, exactly as attention reads them (keys after the rotary embedding
of positions 0..n-1); text tokens take positions n, n+1, ... as after a soft prompt. On disk and in
an ``Adapter`` they are PEFT's PREFIX_TUNING tensor ``prompt_embeddings`` of shape
``(n, L * 2 * kv_heads * head_dim)``: for each virtual token, layer 0's key then value, layer 1's,
..., each ``kv_heads x head_dim`` (PEFT sizes GQA models' prefixes by their key/value heads).

PEFT starts a prefix as N(0, 1) noise, far from the scale of real keys and values, and on small
Llama-family models it barely learns (docs/training.md, "Deep prompts", measures it). softprompt
starts from the keys and values the model itself computes (``init_prefix``): for sampled
vocabulary tokens, for a text, or for a prompt adapter's virtual tokens ("deepening" it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

METHODS = ("prompt", "prefix")


@dataclass(frozen=True)
class PrefixShape:
    """What a prefix must match in a model: layers, key/value heads and head size."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: Any) -> PrefixShape:
        """The shape of ``model``'s attention caches.

        Raises:
            UserError: the model's cache is not one key and one value of fixed heads per layer
                (layers of linear or chunked attention, cross-attention, ...).
        """
        config = model.config.get_text_config()
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if not (layers and heads and hidden) or getattr(config, "is_encoder_decoder", False):
            raise UserError(
                f"--method prefix supports decoder-only models with one key/value cache per "
                f"layer; {type(model).__name__} is not one softprompt knows how to prefix"
            )
        # Sliding-window layers keep keys and values of the same heads and size as global ones
        # (Gemma 2/3, Qwen2, Mistral); other kinds (linear or chunked attention, ...) do not.
        kinds = set(getattr(config, "layer_types", None) or ()) - {
            "full_attention",
            "sliding_attention",
        }
        if kinds:
            raise UserError(
                f"--method prefix: {type(model).__name__} has layers of another attention kind "
                f"({', '.join(sorted(kinds))}); softprompt prefixes full and sliding-window "
                f"attention only"
            )
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(int(layers), int(kv_heads), int(head_dim))

    @property
    def token_dim(self) -> int:
        """PEFT's ``token_dim`` for this model's prefix: one key (or value) of one layer."""
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the PEFT tensor: a key and a value per layer."""
        return self.layers * 2 * self.token_dim

    def mismatch(self, config: dict[str, Any], width: int) -> str | None:
        """Why a prefix adapter (its PEFT config, its tensor's width) cannot run here, or None."""
        theirs = (
            config.get("num_layers"),
            config.get("num_attention_heads"),
            config.get("token_dim"),
        )
        ours = (self.layers, self.kv_heads, self.token_dim)
        for label, got, want in zip(
            ("layers", "key/value heads", "key/value size (token_dim)"), theirs, ours, strict=True
        ):
            if got is not None and got != want:
                return (
                    f"this prefix adapter was made for a model with {got} {label}; "
                    f"this model has {want}"
                )
        if width != self.width:
            return (
                f"this prefix adapter's tensor has {width} columns; this model needs "
                f"{self.width} ({self.layers} layers x 2 x {self.kv_heads} heads x "
                f"{self.head_dim})"
            )
        return None


def split(weights: torch.Tensor, shape: PrefixShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(L, kv_heads, n, head_dim)`` of a PEFT prefix tensor ``(n, width)``."""
    n = weights.shape[0]
    kv = weights.reshape(n, shape.layers, 2, shape.kv_heads, shape.head_dim)
    kv = kv.permute(2, 1, 3, 0, 4)  # (2, L, H, n, Dh)
    return kv[0], kv[1]


def join(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The PEFT prefix tensor ``(n, width)`` of keys and values ``(L, kv_heads, n, head_dim)``."""
    kv = torch.stack([keys, values])  # (2, L, H, n, Dh)
    n = kv.shape[3]
    return kv.permute(3, 1, 0, 2, 4).reshape(n, -1)


@torch.no_grad()
def model_kv(model: Any, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(L, kv_heads, n, head_dim)`` (float32, CPU) the frozen ``model``
    computes for one row of input embeddings ``(n, D)`` at positions 0..n-1."""
    param = next(model.parameters())
    inputs = embeds.to(device=param.device, dtype=param.dtype)[None]
    out = model(inputs_embeds=inputs, use_cache=True)
    cache = out.past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.float().cpu(), values.float().cpu()


def norms(weights: torch.Tensor, shape: PrefixShape) -> tuple[list[float], list[float]]:
    """Mean norm per layer of a prefix's keys and of its values (one vector per head)."""
    keys, values = split(weights.float(), shape)
    return (
        [float(k.norm(dim=-1).mean()) for k in keys],
        [float(v.norm(dim=-1).mean()) for v in values],
    )


def peft_config(
    n: int, shape: PrefixShape, base_name: str, projection: bool = False
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT writes for a causal-LM prefix-tuning adapter."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "encoder_hidden_size": shape.token_dim,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": shape.kv_heads,
        "num_layers": shape.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": n,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": projection,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": shape.token_dim,
    }


def batch_past(
    prefixes: list[torch.Tensor | None], shape: PrefixShape, dtype: torch.dtype
) -> tuple[Any, torch.Tensor, list[int]]:
    """A transformers cache holding each row's prefix, right-aligned to the longest.

    Returns the cache (``DynamicCache``), its attention mask ``(B, n_max)`` (1 where a row has a
    prefix token) and each row's prefix length. Rows without a prefix get an all-masked part.
    Gradients flow back into the prefixes (training).
    """
    from transformers import DynamicCache

    lengths = [0 if p is None else int(p.shape[0]) for p in prefixes]
    longest = max(lengths)
    some = next(p for p in prefixes if p is not None)
    batch = len(prefixes)
    keys = some.new_zeros(shape.layers, batch, shape.kv_heads, longest, shape.head_dim)
    values = torch.zeros_like(keys)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=some.device)
    parts_k, parts_v = [], []
    for b, prefix in enumerate(prefixes):
        if prefix is None:
            parts_k.append(keys[:, b])
            parts_v.append(values[:, b])
            continue
        k, v = split(prefix, shape)  # (L, H, n, Dh)
        pad = longest - lengths[b]
        parts_k.append(torch.cat([keys[:, b, :, :pad], k], dim=2))
        parts_v.append(torch.cat([values[:, b, :, :pad], v], dim=2))
        mask[b, pad:] = 1
    all_k = torch.stack(parts_k, dim=1).to(dtype)  # (L, B, H, n_max, Dh)
    all_v = torch.stack(parts_v, dim=1).to(dtype)
    cache = DynamicCache()
    for layer in range(shape.layers):
        cache.update(all_k[layer], all_v[layer], layer)
    return cache, mask, lengths
