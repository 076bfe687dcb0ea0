"""A lean forward for decoder models over the slot cache (CPU fast path, and the GPU's).

transformers' modules are written for every use; a decode step of a 135M model spends as long
in their small tensor operations (views, casts, masks, rotary halves) as in its matrix products.
This forward does the same arithmetic with fewer operations: the q/k/v projections and the
gate/up projections each become one matrix product on weights packed for oneDNN (``packed.py``),
RMSNorm is one fused call, and a one-token decode step computes attention with two batched
products instead of a general attention kernel. Rotary embeddings come from the model's own
rotary module, so every rope variant it supports is respected. On the CPU, when the fused C
kernels of ``cpu_kernels.py`` are loaded, a decode step runs its attention, normalisations and
SwiGLU on them instead (``_fused_decode``); prefill always runs the PyTorch path here.

One forward serves every family ``families.py`` describes (Llama, Mistral, Qwen2/2.5/3, Gemma
2/3, Phi-3): their differences are options of each layer (q/k norms, windows, soft caps, norms
after attention and the MLP, GeGLU, partial rotary), not copies of the forward. Used on the CPU
in float32 with packed weights (multiplied in float32 or bfloat16, ``packed.py``), and on a GPU
in any floating dtype with plain fused weights (and
there its decode step is captured as a CUDA graph, ``graphs.py``); anything else runs
transformers' own forward. The caller's model is not changed: the fused weights are copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_kernels import AttentionOptions, CpuKernels, DecodeStep
from .families import Family, describe
from .kv_cache import SlotCache
from .packed import PackedLinear


def supports(model: Any) -> bool:
    """Whether the lean forward computes what ``model`` computes (any device or dtype)."""
    return describe(model)[0] is not None


class PlainLinear:
    """``F.linear`` on a weight (and bias) it holds: the GPU's linear, where cuBLAS needs no
    packing."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, owned: bool = False
    ) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.owned = owned
        """Whether the weight is a copy made for this layer (else the model's own)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        """Bytes of the weight copy (0 when it is the model's own tensor)."""
        return self.weight.numel() * self.weight.element_size() if self.owned else 0


Linear = PackedLinear | PlainLinear


def _fused(
    *linears: nn.Linear, norm: torch.Tensor | None, full_batch: int | None, packed: bool
) -> Linear:
    """One linear computing ``linears`` side by side (outputs concatenated).

    ``norm``: the weight of the RMSNorm that feeds them, folded into their columns
    (``W (w * x) = (W diag(w)) x``), so the forward only normalises.
    """
    if not packed:
        bias = _fused_bias(linears)
        return PlainLinear(_fused_weight(linears, norm), bias, owned=True)
    bias = _fused_bias(linears)
    # The plain combined weight is not kept: each copy the chosen path reads (oneDNN's, MKL's,
    # the panels) is built from the model's own tensors when it is made, so the layer gets a
    # zero-stride stand-in of the right shape.
    first = linears[0].weight
    shape = (sum(lin.out_features for lin in linears), first.shape[1])
    return PackedLinear(
        first.new_zeros(()).expand(shape),
        bias,
        full_batch,
        rebuild=lambda: _fused_weight(linears, norm, keep_float=True),
    )


def _fused_bias(linears: tuple[nn.Linear, ...]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat(
        [
            lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
            for lin in linears
        ]
    )


def _fused_weight(
    linears: tuple[nn.Linear, ...], norm: torch.Tensor | None, keep_float: bool = False
) -> torch.Tensor:
    """The weights side by side with ``norm`` folded in float32, then rounded once to the
    model's dtype (``keep_float``: left in float32, for a packed copy that rounds it to its
    own dtype)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    if norm is None:
        return weight
    folded = weight.float() * norm.detach().float()[None, :]
    return folded if keep_float else folded.to(weight.dtype)


def _single(linear: nn.Linear, full_batch: int | None, packed: bool) -> Linear:
    if packed:
        return PackedLinear.of(linear, full_batch)
    return PlainLinear(linear.weight, linear.bias)


def _weight(norm: Any, offset: float) -> torch.Tensor:
    """An RMSNorm's effective weight in float32 (Gemma's ``1 + w``), detached and contiguous."""
    return (norm.weight.detach().float() + offset).contiguous()


class LeanLayer:
    def __init__(
        self,
        layer: Any,
        index: int,
        family: Family,
        eps: float,
        full_batch: int | None,
        packed: bool,
    ) -> None:
        attn, mlp, offset = layer.self_attn, layer.mlp, family.norm_offset
        before_mlp = layer.pre_feedforward_layernorm if family.sandwich else None
        before_mlp = before_mlp or layer.post_attention_layernorm
        norm1 = _weight(layer.input_layernorm, offset)
        norm2 = _weight(before_mlp, offset)
        qkv = [getattr(attn, name) for name in family.qkv]
        self.qkv = _fused(*qkv, norm=norm1, full_batch=full_batch, packed=packed)
        self.o = _single(attn.o_proj, full_batch, packed)
        gate_up = [getattr(mlp, name) for name in family.gate_up]
        self.gate_up = _fused(*gate_up, norm=norm2, full_batch=full_batch, packed=packed)
        self.down = _single(mlp.down_proj, full_batch, packed)
        self.scaling = float(attn.scaling)
        self.gelu = family.gelu
        self.window = family.windows[index] if family.windows else 0
        self.softcap = family.attn_softcap
        self.rotary = family.rotary_types[index] if family.rotary_types else None
        device = attn.o_proj.weight.device
        # Norms on the residual branch (Gemma), in the dtype the forward computes in: the
        # model's, or float32 on packed weights (the CPU's path, whatever the weights are in).
        dtype = torch.float32 if packed else attn.o_proj.weight.dtype
        self.post_attention: torch.Tensor | None = None
        self.post_mlp: torch.Tensor | None = None
        if family.sandwich:
            self.post_attention = _weight(layer.post_attention_layernorm, offset).to(dtype)
            self.post_mlp = _weight(layer.post_feedforward_layernorm, offset).to(dtype)
        self.q_norm: torch.Tensor | None = None
        self.k_norm: torch.Tensor | None = None
        if family.qk_norm:
            self.q_norm = _weight(attn.q_norm, offset).to(dtype)
            self.k_norm = _weight(attn.k_norm, offset).to(dtype)
        on_cpu = device.type == "cpu" and dtype == torch.float32
        self.options = AttentionOptions(
            rotary=self.rotary,
            window=self.window,
            softcap=self.softcap,
            q_norm=self.q_norm if on_cpu else None,
            k_norm=self.k_norm if on_cpu else None,
            qk_eps=eps,
        )
        """What the fused CPU decode kernel needs of this layer (it runs on float32 CPU
        weights only)."""


def _normalise(h: torch.Tensor, eps: float) -> torch.Tensor:
    """``h * rsqrt(mean(h²) + eps)``: RMSNorm without its weight (folded into the next linear).

    One fused reduction (a vector norm) and one product; ``F.rms_norm`` takes about twice as long
    at decode sizes on the CPU, in several passes. Below float32 the statistics are taken in
    float32, as transformers' RMSNorm does.
    """
    if h.is_cuda:
        # One fused kernel on the GPU (statistics in float32 whatever h's dtype), where a decode
        # step is bound by its number of kernels, not their arithmetic.
        return F.rms_norm(h, (h.shape[-1],), eps=eps)
    if h.dtype != torch.float32:
        wide = h.float()
        scale = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).square_()
        return (wide * scale.div_(h.shape[-1]).add_(eps).rsqrt_()).to(h.dtype)
    scale = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_()
    return h * scale.div_(h.shape[-1]).add_(eps).rsqrt_()


def capped(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in place (x is always a fresh product here; the logits of a
    full decode batch are 64 x the vocabulary, where temporaries cost); x as is when cap is 0."""
    return x.div_(cap).tanh_().mul_(cap) if cap else x


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "LeanLayer"], torch.Tensor]
"""``attend(q, keys, values, layer)`` → (B, q, H·Dh), with the layer's scaling, window, cap."""


class LeanDecoder:
    """``forward(cache, embeds, positions, mask)`` → last-position logits, like the model would.

    ``family`` (``families.describe``) says what the model computes beyond Llama's decoder.
    """

    def __init__(
        self,
        model: Any,
        full_batch: int | None = None,
        packed: bool = True,
        kernels: CpuKernels | None = None,
        family: Family | None = None,
    ) -> None:
        config = model.config
        if family is None:
            family, why = describe(model)
            if family is None:
                raise ValueError(f"the lean forward cannot run this model: {why}")
        self.family = family
        self.packed = packed
        self.kernels = kernels
        """The fused CPU kernels for decode steps (``cpu_kernels.py``), or None."""
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.rotary = model.model.rotary_emb
        self.rotary_keys: list[str | None] = [None]
        if family.rotary_types:
            self.rotary_keys = [*sorted(set(family.rotary_types))]
        layers = model.model.layers[: config.num_hidden_layers]
        self.layers = [
            LeanLayer(layer, i, family, self.eps, full_batch, packed)
            for i, layer in enumerate(layers)
        ]
        self.windows = sorted({layer.window for layer in self.layers})
        self.final_softcap = family.final_softcap
        self.lm_head = _fused(
            model.lm_head,
            norm=_weight(model.model.norm, family.norm_offset),
            full_batch=full_batch,
            packed=packed,
        )
        self.embedding = model.get_input_embeddings()
        """The model's embedding module (with Gemma's scale, where it has one)."""

    def linears(self) -> list[Linear]:
        """Every linear layer of the forward: the head, then each layer's four."""
        return [self.lm_head] + [p for x in self.layers for p in (x.qkv, x.o, x.gate_up, x.down)]

    def packed_linears(self) -> list[PackedLinear]:
        """The linear layers on packed weights (none off the CPU path)."""
        return [p for p in self.linears() if isinstance(p, PackedLinear)]

    def nbytes(self) -> int:
        """Bytes of the weight copies (packed, or fused with the norms folded in)."""
        return sum(p.nbytes() for p in self.linears())

    def fused(self, embeds: torch.Tensor) -> bool:
        """Whether a forward of ``embeds`` (B, q, D) runs on the fused CPU kernels (a decode
        step, one new token per row, with the kernels loaded); it then needs no mask."""
        return self.kernels is not None and embeds.shape[1] == 1

    def tables(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """Each rotary table's cos and signed sin at ``positions`` (B, q) → (B, q, R) each.

        Rotary as ``x * cos + roll(x, R/2) * signed_sin``: rotate_half(x) is the rolled x with
        its first half negated, so the sign moves onto sin, computed once for every layer. R is
        the rotated part of a head (all of it unless the model rotates only part: Phi-3)."""
        out = {}
        for key in self.rotary_keys:
            if key is None:
                cos, sin = self.rotary(x, positions)
            else:
                cos, sin = self.rotary(x, positions, key)
            half = cos.shape[-1] // 2
            out[key] = (cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))
        return out

    @torch.no_grad()
    def forward(
        self,
        cache: SlotCache,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        every: bool = False,
    ) -> torch.Tensor:
        """embeds (B, q, D), positions (B, q), mask (B, 1, q, kv) bool → logits (B, V), or
        with ``every`` the logits at every position (B, q, V).

        The mask may be None for a ``fused`` forward (the kernels read the cache's ``valid``)."""
        if self.kernels is not None and embeds.shape[1] == 1 and not every:
            return self._fused_decode(self.kernels, cache, embeds, positions)
        if mask is None:
            raise ValueError("a forward off the fused kernels needs its attention mask")
        length = embeds.shape[1]
        attends = {}
        for window in self.windows:
            windowed = mask if not window else window_mask(mask, cache, positions, window)
            attends[window] = _Attention(windowed, self.heads, self.kv_heads, self.head_dim, length)

        def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: LeanLayer):
            return attends[layer.window](q, keys, values, layer.scaling, layer.softcap)

        h = self.layers_forward(embeds, positions, cache.slot_layers, attend)
        return self.logits(h if every else h[:, -1])

    def layers_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        kv: Sequence[Any],
        attend: Attend,
    ) -> torch.Tensor:
        """The decoder layers: ``kv[i].update(k, v)`` stores layer i's new keys/values and gives
        back all of them; ``attend(q, keys, values, layer)`` → (B, q, H·Dh)."""
        batch, length, _ = embeds.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        tables = {
            key: (cos.unsqueeze(2), sin.unsqueeze(2))  # (B, q, 1, R): over q and k heads at once
            for key, (cos, sin) in self.tables(embeds, positions).items()
        }
        h = embeds
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(_normalise(h, self.eps)).view(batch, length, heads + 2 * kv_heads, dim)
            qk = qkv[:, :, : heads + kv_heads]
            if layer.q_norm is not None and layer.k_norm is not None:
                q_part = _normalise(qk[:, :, :heads], self.eps) * layer.q_norm
                k_part = _normalise(qk[:, :, heads:], self.eps) * layer.k_norm
                qk = torch.cat((q_part, k_part), dim=2)
            cos, sin = tables[layer.rotary]
            rotated = cos.shape[-1]
            if rotated == dim:
                qk = torch.addcmul(qk * cos, qk.roll(rotated // 2, dims=-1), sin)
            else:  # only the first part of each head turns (Phi-3's partial rotary)
                part = qk[..., :rotated]
                part = torch.addcmul(part * cos, part.roll(rotated // 2, dims=-1), sin)
                qk = torch.cat((part, qk[..., rotated:]), dim=-1)
            q = qk[:, :, :heads].transpose(1, 2)  # (B, H, q, Dh)
            k = qk[:, :, heads:].transpose(1, 2)  # (B, KV, q, Dh)
            v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
            keys, values = kv[index].update(k, v)  # (B, KV, kv, Dh)
            if keys.dtype != q.dtype:  # a bfloat16 cache under float32 arithmetic
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            branch = layer.o(attend(q, keys, values, layer))
            if layer.post_attention is not None:
                branch = _normalise(branch, self.eps) * layer.post_attention
            h = h + branch
            gate, up = layer.gate_up(_normalise(h, self.eps)).chunk(2, dim=-1)
            gate = F.gelu(gate, approximate="tanh") if layer.gelu else F.silu(gate)
            branch = layer.down(gate * up)
            if layer.post_mlp is not None:
                branch = _normalise(branch, self.eps) * layer.post_mlp
            h = h + branch
        return h

    def _fused_decode(
        self, kernels: CpuKernels, cache: SlotCache, embeds: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """A decode step on the fused CPU kernels: the same arithmetic as ``layers_forward``
        (up to float rounding) in fewer passes over memory. Each layer's attention
        writes the new key/value into the cache itself and reads each row's valid columns only;
        the residual adds ride along with the normalisations."""
        rows, end = cache.rows, cache.end
        batch, dim = embeds.shape[0], self.head_dim
        rotaries = {
            key: (cos[:, 0].contiguous(), sin[:, 0].contiguous())
            for key, (cos, sin) in self.tables(embeds, positions).items()
        }
        step = DecodeStep(
            kernels, cache.keys, cache.values, cache.valid, rows, end, rotaries, self.heads
        )
        h = embeds[:, 0].clone(memory_format=torch.contiguous_format)  # updated in place
        # On bfloat16 linear layers, what passes between the kernels and the layers (x, the
        # attention's output, the activation) is bfloat16, converted inside the kernels; the
        # residual stream h stays float32.
        narrow = self.layers[0].o.dtype if isinstance(self.layers[0].o, PackedLinear) else None
        narrow = narrow if narrow == torch.bfloat16 else None
        x = h.new_empty(h.shape, dtype=narrow or h.dtype)
        branch = torch.empty_like(h) if self.family.sandwich else None
        step.add_normalise(h, None, self.eps, out=x)
        attention = x.new_empty(batch, self.heads * dim)
        activation: torch.Tensor | None = None

        def residual(out: torch.Tensor, post: torch.Tensor | None) -> None:
            """h += out (normalised with ``post`` first where the family has a norm on the
            branch: Gemma), then x = the normalised h for the next linear."""
            if branch is not None:
                step.add_normalise(out.float(), None, self.eps, out=branch, weight=post)
                out = branch
            step.add_normalise(h, out, self.eps, out=x)

        for index, layer in enumerate(self.layers):
            qkv = _product(layer.qkv, x, narrow)
            step.attention(index, qkv, layer.scaling, out=attention, options=layer.options)
            residual(_product(layer.o, attention, narrow), layer.post_attention)
            gate_up = _product(layer.gate_up, x, narrow)
            if activation is None:
                activation = gate_up.new_empty(batch, gate_up.shape[1] // 2)
            step.silu_mul(gate_up, out=activation, gelu=layer.gelu)
            residual(_product(layer.down, activation, narrow), layer.post_mlp)
        # x: the final norm of h, as ``logits`` takes it
        logits = self.lm_head(x)
        if self.final_softcap and logits.is_contiguous():
            return kernels.softcap(logits, self.final_softcap)
        return capped(logits, self.final_softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last hidden states (..., D) → logits (..., V)."""
        return capped(self.lm_head(_normalise(h, self.eps)), self.final_softcap)


def _product(layer: Linear, x: torch.Tensor, narrow: torch.dtype | None) -> torch.Tensor:
    """``layer(x)``, or with ``narrow`` (bfloat16 linear layers) the product in that dtype,
    input and output alike (``PackedLinear.narrow``)."""
    if narrow is None:
        return layer(x)
    assert isinstance(layer, PackedLinear)  # only packed layers multiply in bfloat16
    return layer.narrow(x)


def window_mask(
    mask: torch.Tensor, cache: SlotCache, positions: torch.Tensor, window: int
) -> torch.Tensor:
    """``mask`` (B, 1, q, kv) narrowed to a sliding window: query at position p sees keys at
    positions p - window + 1 .. p. A row's valid columns hold consecutive positions, so a
    column's position is the count of valid columns before it."""
    kv = mask.shape[-1]
    seen = cache.valid[cache.rows, :kv]
    key_positions = seen.cumsum(-1) - 1  # (B, kv)
    near = positions[:, :, None] - key_positions[:, None, :] < window  # (B, q, kv)
    columns = torch.arange(kv, device=mask.device)
    queries = torch.arange(kv - positions.shape[1], kv, device=mask.device)
    itself = columns[None, :] == queries[:, None]  # a query always sees itself
    return mask & (near | itself[None]).unsqueeze(1)


class _Attention:
    """Grouped-query attention over the slot cache for one forward; the mask is prepared once.

    A decode step (one new token a row) is two batched products per layer, with the mask as an
    additive bias shared by every layer: ``(B·KV, G·1, Dh) @ (B·KV, Dh, kv)`` groups the G query
    heads of each key/value head (on the CPU faster than ``scaled_dot_product_attention`` at one
    query, and reading keys in their stored order). Prefill runs
    ``scaled_dot_product_attention`` on every device: its fused kernel was measured 3x faster
    than the two products on a 2-core Zen 5 for a chunk of 128 tokens against 1,024 or more
    cached ones, and as fast on short prompts (``benchmarks/bench_long_prompts.py``).
    Soft-capped scores (Gemma 2) take the two products at every length (SDPA has no cap).
    Below float32 the softmax is taken in float32.
    """

    max_scores = 1 << 24
    """Score elements above which the memory-bounded kernel runs instead."""

    def __init__(self, mask: torch.Tensor, heads: int, kv_heads: int, dim: int, length: int):
        self.mask, self.heads, self.kv_heads, self.dim = mask, heads, kv_heads, dim
        self.bias = None
        batch, kv = mask.shape[0], mask.shape[-1]
        if length == 1 and batch * heads * kv <= self.max_scores:
            groups = heads // kv_heads
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            bias = bias.masked_fill_(~mask, float("-inf"))  # (B, 1, q, kv)
            bias = bias.unsqueeze(1).expand(batch, kv_heads, groups, length, kv)
            self.bias = bias.reshape(-1, groups * length, kv)

    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling: float,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        """q (B, H, q, Dh), keys/values (B, KV, kv, Dh) → (B, q, H·Dh)."""
        batch, heads, length, dim = q.shape
        if softcap and self.bias is None:
            return self._capped(q, keys, values, scaling, softcap)
        if self.bias is None:
            if keys.stride(-1) != 1:
                # Keys stored transposed (the CPU cache): the fused kernel wants the head
                # dimension contiguous, or PyTorch falls back to its slow reference path.
                keys = keys.contiguous()
            out = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=self.mask,
                scale=scaling,
                enable_gqa=self.kv_heads != heads,
            )
            return out.transpose(1, 2).reshape(batch, length, heads * dim)
        kv = keys.shape[-2]
        grouped = q.reshape(-1, heads // self.kv_heads * length, dim)  # (B·KV, G·q, Dh)
        # The slot cache stores keys transposed, so this is a view, read in memory order.
        keys_t = keys.transpose(2, 3).reshape(-1, dim, kv)  # (B·KV, Dh, kv)
        if softcap:
            scores = capped(torch.bmm(grouped, keys_t) * scaling, softcap)
            scores = scores + self.bias.to(q.dtype)
        else:
            scores = torch.baddbmm(self.bias.to(q.dtype), grouped, keys_t, alpha=scaling)
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(weights, values.reshape(-1, kv, dim))  # (B·KV, G·q, Dh)
        if length == 1:
            return out.view(batch, 1, heads * dim)
        return out.view(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, -1)

    def _capped(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling: float,
        softcap: float,
    ) -> torch.Tensor:
        """Attention with soft-capped scores at any length: the scores of the G query heads of
        each key/value head in one product, capped, masked, normalised."""
        batch, heads, length, dim = q.shape
        kv, groups = keys.shape[-2], heads // self.kv_heads
        grouped = q.reshape(batch, self.kv_heads, groups * length, dim)
        scores = capped(torch.matmul(grouped, keys.transpose(-1, -2)) * scaling, softcap)
        scores = scores.view(batch, self.kv_heads, groups, length, kv)
        scores = scores.masked_fill(~self.mask[:, :, None], float("-inf"))
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights.view(batch, self.kv_heads, groups * length, kv), values)
        return out.view(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, -1)
