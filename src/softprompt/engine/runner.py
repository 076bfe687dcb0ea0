"""Runs the frozen base model: adapter prefixes, prefill of joining requests, decode steps.

The runner knows tensors, not requests. It leaves the model exactly as it was: inputs reach it
as ``inputs_embeds`` with explicit position ids and a 4-D boolean attention mask built from the
slot cache, so rows of any length, with any adapter prefix or none, run in one forward.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import Adapter
from ..device import native_cpu_bf16
from .autotune import (
    ENV_PACK,
    ENV_PANELS,
    ENV_RETUNE,
    Decision,
    DecodePath,
    cache_key,
    decide,
    forced,
    time_steps,
)
from .cpu_kernels import ENV, CpuKernels
from .cpu_kernels import load as load_cpu_kernels
from .families import describe
from .graphs import GraphedDecode
from .kv_cache import SlotCache
from .lean import LeanDecoder, window_mask
from .packed import PackedLinear, can_pack, packed_model
from .registry import Prefix
from .sampling import RequestError

log = logging.getLogger(__name__)

LINEAR_DTYPES = (None, "auto", "float32", "bfloat16")
"""``DecodeSwitches.linear_dtype``'s values."""


@dataclass(frozen=True)
class DecodeSwitches:
    """How the runner's decode steps run; a switch left at None is decided on the machine at
    hand (``autotune.py`` measures and caches what it can)."""

    packed_weights: bool | None = None
    """Linear layers on packed weights (CPU float32 only; None: when that applies):
    the decoder families of ``families.py`` through the lean forward of ``lean.py``, others
    through a shadow of the model (``packed.py``)."""
    lean_forward: bool = True
    """The lean forward for the families it knows (False: transformers' forward always)."""
    graphs: bool | None = None
    """Decode steps of fixed shape (``graphs.py``), recorded as CUDA graphs on a GPU (None: on
    a GPU, where the lean forward applies); on the CPU they run eagerly."""
    full_batch_pack: bool | None = None
    """With packed weights, a second copy packed for MKL at the largest batch, for full decode
    batches (None: if measured faster; False: never packed)."""
    cpu_kernels: bool | None = None
    """Decode steps of the lean forward on the CPU run the fused C kernels of
    ``cpu_kernels.py`` (None: where they build and are measured faster; True fails if they do
    not build)."""
    panel_linear: bool | None = None
    """Linear layers on the C kernel's panel layout instead of oneDNN/MKL (None: if measured
    faster, with the fused kernels; only that copy of the weights is kept)."""
    linear_dtype: str | None = None
    """What the CPU's lean forward multiplies its linear layers in: ``float32``, ``bfloat16``,
    ``auto`` (measured) or None (float32 for a float32 model, ``auto`` for a bfloat16 one);
    everything else runs in float32 on that path (``EngineConfig.cpu_linear_dtype``)."""
    tune: bool = True
    """Measure the undecided switches (else: MKL off, the kernels on where they build)."""
    retune: bool = False
    """Measure again even when this machine has a decision cached."""


def owner_digest(adapter: Adapter, weights: torch.Tensor) -> bytes:
    """What identifies the keys/values an adapter puts before the text: its method and rows
    (as the runner reads them), whatever its name."""
    h = hashlib.blake2b(adapter.method.encode(), digest_size=16)
    h.update(str(tuple(weights.shape)).encode())
    h.update(weights.detach().float().numpy(force=True).tobytes())
    return h.digest()


class ModelRunner:
    """Args:
    model: the caller's model; it is never changed.
    switches: how decode steps run (``DecodeSwitches``).
    max_batch: rows of the largest decode step (for graphs, and MKL's full-batch copy).
    """

    def __init__(
        self, model: Any, switches: DecodeSwitches | None = None, max_batch: int = 32
    ) -> None:
        switches = switches or DecodeSwitches()
        self.switches = switches
        full_batch = None if switches.full_batch_pack is False else max_batch
        graphs, cpu_kernels = switches.graphs, switches.cpu_kernels
        model_dtype = model.get_input_embeddings().weight.dtype
        family, why = describe(model)
        if not switches.lean_forward:
            family, why = None, "the lean forward is switched off"
        pack = switches.packed_weights
        if pack is None:
            # Below float32 only the lean forward packs (it computes in float32 around the
            # linears); transformers' forward would get float32 out of a bfloat16 layer.
            pack = can_pack(model) and (model_dtype == torch.float32 or family is not None)
        self.packed = bool(pack)
        on_gpu = model.get_input_embeddings().weight.device.type == "cuda"
        self.lean = None
        self.decode_path: Decision | None = None
        """On the CPU's lean forward: the decode path in use and why (``autotune.py``)."""
        if family is None and (self.packed or on_gpu):
            log.info("transformers' forward runs this model, not the lean one: %s", why)
        if family is not None and (self.packed or on_gpu):
            kernels = None
            if self.packed and cpu_kernels is not False:
                kernels = load_cpu_kernels()
                if kernels is None and cpu_kernels:
                    raise RuntimeError(
                        "the fused CPU kernels were asked for but are not available (no C "
                        "compiler, a failed build, or SOFTPROMPT_CPU_KERNELS=0)"
                    )
            self.lean = LeanDecoder(
                model,
                full_batch if self.packed else None,
                packed=self.packed,
                kernels=kernels,
                family=family,
            )
        self.graphed = None
        if (on_gpu if graphs is None else graphs) and self.lean is not None:
            self.graphed = GraphedDecode(self.lean, max_batch, capture=on_gpu)
        if self.packed and self.lean is None:
            self.model = packed_model(model, full_batch)
        else:
            self.model = model
        self.base = model
        config = model.config.get_text_config()
        self._mask_facts = (
            int(getattr(config, "sliding_window", None) or 0),
            getattr(config, "layer_types", None),
            getattr(config, "_attn_implementation", None) == "eager",
        )
        """What transformers' forward needs of the mask (``_masks``): the window, the layer
        types, whether attention is eager."""
        embedding = model.get_input_embeddings()
        self.embedding = embedding
        self.vocab_size = int(embedding.num_embeddings)
        self.hidden_size = int(embedding.embedding_dim)
        self.num_layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.max_length = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.device = embedding.weight.device
        self.dtype = torch.float32 if self.lean is not None and self.packed else model_dtype
        """The dtype of the runner's activations: the model's, except on the CPU's lean
        forward, which computes in float32 whatever its weights are in."""
        self.cache_dtype = self.dtype
        """The KV cache's dtype: the activations', or bfloat16 on the CPU's bfloat16 path
        (the fused kernels read it widened to float32)."""
        if self.lean is not None and self.packed:
            retune = switches.retune or os.environ.get(ENV_RETUNE) == "1"
            self.decode_path = self._choose_decode_path(
                full_batch, switches.full_batch_pack, switches.tune, retune
            )

    def _choose_decode_path(
        self, full_batch: int | None, full_batch_pack: bool | None, tune: bool, retune: bool
    ) -> Decision:
        """Set the CPU decode path: forced switches as given, the rest measured (or cached)."""
        from ..models import cache_dir

        lean = self.lean
        assert lean is not None
        kernels = lean.kernels
        mkl = [False]
        if full_batch and any(p.full_batch for p in lean.packed_linears()):
            wanted = forced(ENV_PACK, full_batch_pack)
            mkl = [True, False] if wanted is None and tune else [bool(wanted)]
        fused = [False]
        if kernels is not None:
            forced_kernels = self.switches.cpu_kernels
            wanted = forced(ENV, None) if forced_kernels is None else forced_kernels
            fused = [True, False] if wanted is None and tune else [wanted is not False]
        candidates = [DecodePath(m, k) for m in mkl for k in fused]
        dtypes = self._linear_dtypes()
        if len(dtypes) > 1 and not tune:  # unmeasured, the exact one
            dtypes = ("float32",)
        if "bfloat16" in dtypes:
            halves = [DecodePath(False, k, bfloat16=True) for k in fused]
            candidates = halves if "float32" not in dtypes else candidates + halves
        panels = forced(ENV_PANELS, self.switches.panel_linear)
        if panels and kernels is None:
            raise RuntimeError(
                "the panel linears were asked for but the CPU kernels are not available"
            )
        if kernels is not None and True in fused and panels is not False and "float32" in dtypes:
            # The panel linears come from the same library as the fused kernels: with them.
            with_panels = DecodePath(False, True, panel_linear=True)
            if panels:
                candidates = [with_panels]
            elif tune:  # unmeasured, oneDNN stays: the panel kernel is written for AVX2
                candidates.append(with_panels)

        def measure(path: DecodePath) -> float:
            self._set_decode_path(path, full_batch, kernels)
            return self._time_decode(full_batch or 1)

        shape: tuple[int | str, ...] = (
            self.num_layers,
            self.hidden_size,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )
        if lean.family.name != "llama":  # (Llama's decisions cached before families keep)
            shape = (*shape, lean.family.name)
        key = cache_key(shape, full_batch or 1, candidates)
        decision = decide(candidates, measure, key, cache_dir() if tune else None, retune=retune)
        self._set_decode_path(decision.picked, full_batch, kernels)
        for linear in lean.packed_linears():  # the copies measuring made for the losers
            linear.keep_only(decision.picked.panel_linear, mkl=decision.picked.full_batch_pack)
        if decision.measured:
            log.info(decision.summary())
        return decision

    def _set_decode_path(
        self, path: DecodePath, full_batch: int | None, kernels: CpuKernels | None
    ) -> None:
        lean = self.lean
        assert lean is not None
        lean.kernels = kernels if path.cpu_kernels else None
        for linear in lean.packed_linears():
            linear.full_batch = full_batch if path.full_batch_pack else None
            linear.use_panels(kernels if path.panel_linear else None)
            linear.use_dtype(torch.bfloat16 if path.bfloat16 else torch.float32)
        self.cache_dtype = torch.bfloat16 if path.bfloat16 else self.dtype

    def _linear_dtypes(self) -> tuple[str, ...]:
        """The dtypes the lean forward's linear layers may run in here (``linear_dtype``)."""
        wanted = self.switches.linear_dtype
        bf16_model = self.base.get_input_embeddings().weight.dtype == torch.bfloat16
        if wanted is None:
            wanted = "auto" if bf16_model else "float32"
        if wanted != "auto":
            if wanted == "bfloat16" and not can_pack(self.base, torch.bfloat16):
                raise RuntimeError(
                    "bfloat16 linear layers were asked for but oneDNN cannot run them here"
                )
            return (wanted,)
        native = native_cpu_bf16() or bf16_model
        return (
            ("float32", "bfloat16")
            if native and can_pack(self.base, torch.bfloat16)
            else ("float32",)
        )

    def _time_decode(self, batch: int, context: int = 48) -> float:
        """Median ms of a decode step of ``batch`` rows over ``context`` cached columns."""
        cache = self.new_cache(batch, context + 1)
        cache.valid[:, :context] = True
        cache.end = context
        tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        positions = torch.full((batch,), context, dtype=torch.long, device=self.device)
        rows = slice(0, batch)
        return time_steps(lambda: self.decode(cache, rows, tokens, positions), 2, 4)

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight copies of the fast path (0 without it)."""
        if self.lean is not None:
            return self.lean.nbytes()
        return sum(m.nbytes() for m in self.model.modules() if isinstance(m, PackedLinear))

    def new_cache(self, slots: int, capacity: int) -> SlotCache:
        return SlotCache(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            slots,
            capacity,
            dtype=self.cache_dtype,
            device=self.device,
        )

    @torch.no_grad()
    def forward(
        self,
        cache: SlotCache,
        rows: slice,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        new_valid: torch.Tensor,
        every: bool = False,
    ) -> torch.Tensor:
        """Run ``embeds`` (B, q, D) for cache rows ``rows``; returns last-position logits (B, V)
        (with ``every``: the logits at every position, (B, q, V)).

        The new keys/values land at columns ``cache.end ..``; the caller advances ``end`` once
        every row of the step has run. On failure the new columns are marked invalid again.
        """
        cache.rows = rows
        cache.mark(rows, new_valid)
        try:
            lean = self.lean
            # The fused decode kernels read the cache's valid columns themselves.
            fused = lean is not None and lean.fused(embeds) and not every
            mask = None if fused else cache.mask(rows, embeds.shape[1])
            if lean is not None:
                logits = lean.forward(cache, embeds, positions, mask, every)
            else:
                assert mask is not None  # only the lean forward's decode steps go without
                out = self.model(
                    inputs_embeds=embeds,
                    attention_mask=self._masks(cache, mask, positions),
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=0 if every else 1,
                )
                logits = out.logits if every else out.logits[:, -1]
        except BaseException:
            cache.mark(rows, torch.zeros_like(new_valid))
            raise
        return logits[..., : self.vocab_size].float()

    def _masks(self, cache: SlotCache, mask: torch.Tensor, positions: torch.Tensor) -> Any:
        """The attention mask as transformers' forward takes it. A 4-D mask is used as given
        for every layer, so a model with sliding windows gets them applied here: the windowed
        mask alone where every layer is windowed, else one per layer type. Eager attention
        adds its mask to the scores: it gets 0 and -inf, not booleans."""
        window, types, eager = self._mask_facts
        masks = {"full_attention": mask}
        if window and (not types or "sliding_attention" in types):
            masks["sliding_attention"] = window_mask(mask, cache, positions, window)
        if eager:
            for kind, given in masks.items():
                additive = torch.zeros(given.shape, dtype=self.dtype, device=given.device)
                masks[kind] = additive.masked_fill_(~given, torch.finfo(self.dtype).min)
        if len(masks) == 1:
            return masks["full_attention"]
        return masks if types else masks["sliding_attention"]

    def prefixes(self, adapters: list[Adapter]) -> list[Prefix]:
        """Keys/values of each adapter's virtual tokens at positions 0..n-1, for every layer.

        All prompt adapters run in one forward, rows right-aligned to the longest (a prefix
        depends on its own rows only: padding is masked out). A prefix adapter (deep prompt)
        already is its keys/values: they are only laid out per layer.
        """
        deep = [a for a in adapters if a.method == "prefix"]
        if deep:
            shallow = iter(self.prefixes([a for a in adapters if a.method != "prefix"]))
            stored = iter([self.stored_prefix(a) for a in deep])
            return [next(stored) if a.method == "prefix" else next(shallow) for a in adapters]
        if not adapters:
            return []
        rows = []
        for adapter in adapters:
            weights = adapter.weights.detach().to(device=self.device, dtype=self.dtype)
            if not bool(torch.isfinite(weights).all()):
                raise RequestError(f"adapter {adapter.name!r} has NaN or infinite values")
            rows.append(weights)
        lengths = [r.shape[0] for r in rows]
        longest = max(lengths)
        embeds = rows[0].new_zeros(len(rows), longest, self.hidden_size)
        positions = torch.zeros(len(rows), longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=self.device)
        for j, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            embeds[j, longest - n :] = r
            positions[j, longest - n :] = torch.arange(n, device=self.device)
            valid[j, longest - n :] = True
        cache = self.new_cache(len(rows), longest)
        self.forward(cache, slice(0, len(rows)), embeds, positions, valid)
        return [
            Prefix(
                keys=[k[j, :, longest - n :].clone() for k in cache.keys],
                values=[v[j, :, longest - n :].clone() for v in cache.values],
                owner=owner_digest(adapter, weights),
            )
            for j, (adapter, weights, n) in enumerate(zip(adapters, rows, lengths, strict=True))
        ]

    def stored_prefix(self, adapter: Adapter) -> Prefix:
        """A prefix adapter's keys/values, per layer ``(H, n, Dh)``, in the cache's dtype."""
        from ..prefix import split

        weights = adapter.weights.detach()
        if not bool(torch.isfinite(weights).all()):
            raise RequestError(f"adapter {adapter.name!r} has NaN or infinite values")
        weights = weights.to(device=self.device, dtype=self.dtype)
        keys, values = split(weights, self.prefix_shape)
        return Prefix(
            keys=list(keys.to(self.cache_dtype).contiguous()),
            values=list(values.to(self.cache_dtype).contiguous()),
            owner=owner_digest(adapter, weights),
        )

    @property
    def prefix_shape(self) -> Any:
        """The model's ``prefix.PrefixShape`` (``UserError`` if prefixes cannot fit it)."""
        from ..prefix import PrefixShape

        return PrefixShape.of(self.base)

    def prefix(self, adapter: Adapter) -> Prefix:
        """The prefix of one adapter (see ``prefixes``)."""
        return self.prefixes([adapter])[0]

    def prefill(
        self, prompts: list[list[int]], prefixes: list[Prefix | None], every: bool = False
    ) -> tuple[SlotCache, torch.Tensor]:
        """Prefill joining requests' text after their cached prefixes.

        Row j is laid out ``[pad][prefix j][pad][text j]``: prefixes right-aligned to the longest
        one, texts left-padded to the longest one. Returns a cache holding the rows (to copy into
        the engine's slots) and each row's next-token logits (n, V); with ``every``, the logits
        at every text position (n, longest text, V), row j's text at its last ``len(text j)``.
        """
        n = len(prompts)
        longest_prefix = max((p.length for p in prefixes if p is not None), default=0)
        longest_text = max(len(p) for p in prompts)
        cache = self.new_cache(n, longest_prefix + longest_text)
        cache.end = longest_prefix
        ids = torch.zeros(n, longest_text, dtype=torch.long)
        valid = torch.zeros(n, longest_text, dtype=torch.bool)
        positions = torch.zeros(n, longest_text, dtype=torch.long)
        sharing: dict[int, tuple[Prefix, list[int]]] = {}  # rows by the prefix they share
        for j, (text, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
            start = prefix.length if prefix is not None else 0
            if prefix is not None and start:
                sharing.setdefault(id(prefix), (prefix, []))[1].append(j)
            pad = longest_text - len(text)
            ids[j, pad:] = torch.tensor(text)
            valid[j, pad:] = True
            positions[j, :] = start
            positions[j, pad:] = torch.arange(start, start + len(text))
        for prefix, rows in sharing.values():
            cache.write_prefix(rows, prefix.keys, prefix.values)
        embeds = self._embed(ids.to(self.device))
        logits = self.forward(
            cache, slice(0, n), embeds, positions.to(self.device), valid.to(self.device), every
        )
        cache.advance(longest_text)
        return cache, logits

    def staging(self, context: Prefix | None, length: int) -> SlotCache:
        """A one-row cache for a prompt computed in chunks: ``context`` (the keys/values before
        its text) in its first columns, room for ``length`` text tokens after them."""
        before = context.length if context is not None else 0
        cache = self.new_cache(1, before + length)
        if before:
            assert context is not None
            cache.end = before
            cache.write_prefix([0], context.keys, context.values)
        return cache

    def extend(
        self, cache: SlotCache, ids: list[int], start: int, every: bool = False
    ) -> torch.Tensor:
        """Compute the next chunk ``ids`` of a one-row cache's text, at positions ``start ..``;
        returns its last position's logits (1, V) (with ``every``: every position's, (1, q, V)).
        Attention spans the chunk against what the row holds: memory grows with the chunk, not
        with the square of the prompt."""
        q = len(ids)
        embeds = self._embed(torch.tensor([ids], device=self.device))
        positions = torch.arange(start, start + q, device=self.device)[None]
        valid = torch.ones(1, q, dtype=torch.bool, device=self.device)
        logits = self.forward(cache, slice(0, 1), embeds, positions, valid, every)
        cache.advance(q)
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids through the model's embedding, in the runner's dtype."""
        return self.embedding(ids).to(self.dtype)

    def decode(
        self, cache: SlotCache, rows: slice, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row ``tokens`` (B,) at ``positions`` (B,); returns logits (B, V).

        The caller advances the cache's write column after the step.
        """
        if self.graphed is not None and rows.start == 0:
            logits = self.graphed(cache, rows.stop, tokens, positions)
            return logits[:, : self.vocab_size].float()
        embeds = self._embed(tokens[:, None])
        valid = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=self.device)
        return self.forward(cache, rows, embeds, positions[:, None], valid)
