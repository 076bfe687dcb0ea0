"""A lean forward for Llama-family models on the CPU, over the slot cache.

transformers' modules are written for every use; a decode step of a 135M model spends as long
in their small tensor operations (views, casts, masks, rotary halves) as in its matrix products.
This forward does the same arithmetic with fewer operations: the q/k/v projections and the
gate/up projections each become one matrix product on weights packed for oneDNN (``packed.py``),
RMSNorm is one fused call, and a one-token decode step computes attention with two batched
products instead of a general attention kernel. Rotary embeddings come from the model's own
rotary module, so every rope variant it supports is respected.

Used for ``model_type == "llama"`` in float32 on the CPU; anything else runs transformers' own
forward. The caller's model is not changed: the packed weights are copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .kv_cache import SlotCache
from .packed import PackedLinear


def supports(model: Any) -> bool:
    """Whether the lean forward applies to ``model``."""
    config = model.config
    weight = next(model.parameters())
    return (
        getattr(config, "model_type", None) == "llama"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


def _fused(*linears: nn.Linear) -> PackedLinear:
    """One packed linear computing ``linears`` side by side (outputs concatenated)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat(
            [
                lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                for lin in linears
            ]
        )
    combined = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        combined.weight.copy_(weight)
        if bias is not None:
            combined.bias.copy_(bias)
    return PackedLinear(combined)


class _Layer:
    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = PackedLinear(attn.o_proj)
        self.gate_up = _fused(mlp.gate_proj, mlp.up_proj)
        self.down = PackedLinear(mlp.down_proj)
        self.norm1 = layer.input_layernorm.weight
        self.norm2 = layer.post_attention_layernorm.weight
        self.scaling = float(attn.scaling)


class LeanLlama:
    """``forward(cache, embeds, positions, mask)`` → last-position logits, like the model would."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.rotary = model.model.rotary_emb
        self.layers = [_Layer(layer) for layer in model.model.layers[: config.num_hidden_layers]]
        self.norm = model.model.norm.weight
        self.lm_head = PackedLinear(model.lm_head)

    def nbytes(self) -> int:
        """Bytes of the packed weight copies."""
        packed = [self.lm_head] + [p for x in self.layers for p in (x.qkv, x.o, x.gate_up, x.down)]
        return sum(p.packed.numel() * p.packed.element_size() for p in packed)

    @torch.no_grad()
    def forward(
        self, cache: SlotCache, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """embeds (B, q, D), positions (B, q), mask (B, 1, q, kv) bool → logits (B, V)."""
        batch, length, hidden = embeds.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.rotary(embeds, positions)  # (B, q, Dh) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        h = embeds
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(h, (hidden,), layer.norm1, self.eps)
            qkv = layer.qkv(x)  # (B, q, (H + 2 KV) Dh)
            q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q = q.view(batch, length, heads, dim).transpose(1, 2)  # (B, H, q, Dh)
            k = k.view(batch, length, kv_heads, dim).transpose(1, 2)
            v = v.view(batch, length, kv_heads, dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.slot_layers[index].update(k, v)  # (B, KV, kv, Dh)
            out = _attention(q, keys, values, mask, layer.scaling)  # (B, H, q, Dh)
            h = h + layer.o(out.transpose(1, 2).reshape(batch, length, heads * dim))
            x = F.rms_norm(h, (hidden,), layer.norm2, self.eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        last = F.rms_norm(h[:, -1], (hidden,), self.norm, self.eps)
        return self.lm_head(last)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Grouped-query attention; q (B, H, q, Dh), keys/values (B, KV, kv, Dh), mask (B, 1, q, kv)."""
    batch, heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    if length > 1:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=kv_heads != heads
        )
    # One new token per row: (B, KV, G, Dh) @ (B, KV, Dh, kv) groups the heads of each kv head.
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scaling  # (B, KV, G, kv)
    scores = scores.masked_fill(~mask.view(batch, 1, 1, -1), float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), values)  # (B, KV, G, Dh)
    return out.reshape(batch, heads, 1, dim)
