"""Which decoder families the lean forward runs, and what each one computes differently.

Llama, Mistral, Qwen2/2.5/3, Gemma 2/3 and Phi-3 are one decoder with a few differences: a bias
on q/k/v, an RMSNorm on each q/k head, sliding windows on some or all layers, ``(1 + w)`` norm
weights, norms after attention and the MLP as well as before, GELU instead of SiLU in the gated
MLP, soft-capped attention scores and logits, a rotary table per layer type, fused q/k/v and
gate/up weights, a rotation of only part of each head. ``describe(model)`` reads them from the
model's config into one ``Family``, each difference a named field, and refuses (with the reason)
anything it does not know to compute exactly, so such a model runs transformers' own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass(frozen=True)
class Family:
    """What the lean forward needs to know about a decoder's arithmetic beyond Llama's."""

    name: str
    """The config's ``model_type``."""
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    """The attention's projections, q then k then v (Phi-3: one fused ``qkv_proj``)."""
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    """The MLP's gate and up projections (Phi-3: one fused ``gate_up_proj``)."""
    norm_offset: float = 0.0
    """Added to every RMSNorm weight (Gemma's norms scale by ``1 + w``)."""
    sandwich: bool = False
    """Norms after attention and after the MLP too, on the residual branch (Gemma 2/3); the
    norm before the MLP is then ``pre_feedforward_layernorm``."""
    qk_norm: bool = False
    """An RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3)."""
    gelu: bool = False
    """GeGLU (GELU's tanh approximation) instead of SwiGLU."""
    attn_softcap: float = 0.0
    """Attention scores become ``c * tanh(scores / c)`` (0: none; Gemma 2)."""
    final_softcap: float = 0.0
    """Logits become ``c * tanh(logits / c)`` (0: none; Gemma 2)."""
    windows: tuple[int, ...] = ()
    """Each layer's sliding window in positions (0: attends to everything)."""
    rotary_types: tuple[str, ...] = ()
    """Each layer's rotary table, for a rotary module with one per layer type (Gemma 3); empty
    where the model has one table."""


def describe(model: Any) -> tuple[Family | None, str]:
    """The model's ``Family``, or None and why the lean forward cannot run it exactly."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or not hasattr(inner, "layers"):
        return None, f"{kind or type(model).__name__} is not a decoder the lean forward knows"
    if not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return None, f"{kind}: no rotary module or language-model head where expected"
    layers = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        return None, f"{kind}: layer types {sorted(set(types))} are not all full or sliding"
    window = int(getattr(config, "sliding_window", None) or 0)
    per_type = [window if t == "sliding_attention" else 0 for t in types]
    every = tuple([window] * layers)
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "")
    if getattr(config, "mlp_bias", False) or getattr(config, "pretraining_tp", 1) != 1:
        return None, f"{kind}: an MLP bias or tensor-parallel slicing"
    if getattr(config, "use_bidirectional_attention", False):
        return None, f"{kind}: bidirectional attention"
    if kind in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        if activation != "silu":
            return None, f"{kind}: activation {activation!r}, not SiLU"
        if kind == "llama":
            return Family(kind, windows=(0,) * layers), ""
        if kind == "mistral":  # windows every layer when the config names one, as Phi-3
            return Family(kind, windows=every), ""
        if kind == "phi3":
            return Family(kind, ("qkv_proj",), ("gate_up_proj",), windows=every), ""
        return Family(kind, qk_norm=kind == "qwen3", windows=tuple(per_type)), ""
    if kind in ("gemma2", "gemma3_text"):
        if activation not in GELU_TANH:
            return None, f"{kind}: activation {activation!r}, not GELU's tanh approximation"
        gemma3 = kind == "gemma3_text"
        rotary = tuple(types) if gemma3 else ()
        return (
            Family(
                kind,
                norm_offset=1.0,
                sandwich=True,
                qk_norm=gemma3,
                gelu=True,
                attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
                final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
                windows=tuple(per_type),
                rotary_types=rotary,
            ),
            "",
        )
    return None, f"model type {kind!r} has no lean forward yet"
