"""Decode steps of fixed shape, replayed from CUDA graphs on a GPU.

At a small model's sizes a GPU decode step is bound by launching its few hundred kernels from
Python, not by arithmetic (transformers' ``generate`` spends about 22 ms a step on a 135M model on
an H200). A CUDA graph records the step's kernels once and replays them with one launch. That
needs every shape and address fixed, so this step differs from ``LeanDecoder.forward`` in three
ways, none of which changes what it computes:

- the batch is rounded up to a bucket (1, 2, 4, 8, then multiples of 8); rows past the real batch
  are free slots of the cache, which the step writes into and which nothing reads;
- the new keys/values go to the cache column held in a tensor (``index_copy_``), not a Python
  slice, and the step marks that column valid itself;
- attention covers the cache's whole capacity, masked by its ``valid`` flags, not ``:end``.

One graph is kept per (bucket, cache buffers): a cache that grows gets new buffers, and the
graphs of the old ones are dropped. On the CPU the same step runs eagerly (no capture), which is
how the tests check it against the ordinary forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .kv_cache import SlotCache
from .lean import LeanDecoder, LeanLayer, capped

log = logging.getLogger(__name__)


def bucket(batch: int) -> int:
    """The batch size a step of ``batch`` rows runs at."""
    if batch <= 4:
        return 1 << (batch - 1).bit_length()
    return (batch + 7) // 8 * 8


class _ColumnWriter:
    """Layer ``index``'s keys/values: writes the new ones at the step's column, gives all back."""

    def __init__(self, cache: SlotCache, index: int, rows: int, column: torch.Tensor) -> None:
        self.keys = cache.keys[index][:rows]
        self.values = cache.values[index][:rows]
        self.column = column

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.column, k)
        self.values.index_copy_(2, self.column, v)
        return self.keys, self.values


class _FullAttention:
    """One query per row against every column of the cache; invalid columns get -inf, and so do
    columns outside a layer's sliding window (a row's valid columns hold consecutive
    positions: a column's position is the count of valid columns before it)."""

    def __init__(
        self,
        valid: torch.Tensor,
        positions: torch.Tensor,
        heads: int,
        kv_heads: int,
        dtype: torch.dtype,
        windows: list[int],
    ):
        rows, columns = valid.shape
        self.groups = heads // kv_heads
        key_positions = valid.cumsum(-1) - 1  # (R, C)
        self.bias = {}
        for window in windows:
            seen = valid
            if window:
                near = positions[:, None] - key_positions < window
                seen = valid & near
            bias = torch.zeros(rows, 1, 1, columns, dtype=dtype, device=valid.device)
            bias = bias.masked_fill(~seen[:, None, None, :], float("-inf"))
            bias = bias.expand(rows, kv_heads, self.groups, columns)
            self.bias[window] = bias.reshape(-1, self.groups, columns)

    def __call__(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: LeanLayer
    ) -> torch.Tensor:
        batch, heads, _, dim = q.shape
        columns = keys.shape[-2]
        grouped = q.reshape(-1, self.groups, dim)  # (B·KV, G, Dh)
        if keys.stride(-1) == 1:  # plain layout (GPU): cuBLAS reads the transposed view as is
            keys_t = keys.reshape(-1, columns, dim).transpose(1, 2)
        else:  # stored transposed (CPU): the view is in memory order
            keys_t = keys.transpose(2, 3).reshape(-1, dim, columns)  # (B·KV, Dh, C)
        bias = self.bias[layer.window]
        if layer.softcap:
            scores = capped(torch.bmm(grouped, keys_t) * layer.scaling, layer.softcap) + bias
        else:
            scores = torch.baddbmm(bias, grouped, keys_t, alpha=layer.scaling)
        # The GPU's softmax accumulates in float32 whatever the input dtype: one kernel.
        if scores.is_cuda or scores.dtype == torch.float32:
            weights = scores.softmax(dim=-1)
        else:
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(weights, values.reshape(-1, columns, dim))  # (B·KV, G, Dh)
        return out.view(batch, 1, heads * dim)


class GraphedDecode:
    """``__call__(cache, batch, tokens, positions)`` → logits ``(batch, V)`` of one decode step.

    Args:
        lean: the lean forward whose weights the step uses.
        max_batch: the most rows a step has (the cache's slots).
        capture: record CUDA graphs (on a GPU); False runs the same step eagerly.
    """

    def __init__(self, lean: LeanDecoder, max_batch: int, capture: bool) -> None:
        self.lean = lean
        weight = lean.embedding.weight
        self.device = weight.device
        self.capture = capture
        self.max_batch = max_batch
        self.tokens = torch.zeros(bucket(max_batch), dtype=torch.long, device=self.device)
        self.positions = torch.zeros_like(self.tokens)
        self.column = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._buffers: tuple[int, ...] = ()
        self._pool: Any = None

    def __call__(
        self, cache: SlotCache, batch: int, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        rows = min(bucket(batch), cache.slots)
        self.tokens[:batch].copy_(tokens, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.column.fill_(cache.end)
        if not self.capture:
            return self._step(cache, rows)[:batch]
        buffers = tuple(id(t) for t in (*cache.keys, *cache.values, cache.valid))
        if buffers != self._buffers:
            # Recorded against buffers the cache has let go. Their memory pool goes with them: a
            # pool handle whose graphs are all gone cannot be recorded into again (PyTorch's
            # allocator asserts), so the next recording starts a new one.
            self.graphs.clear()
            self._pool = None
            self._buffers = buffers
        if rows not in self.graphs:
            try:
                self.graphs[rows] = self._record(cache, rows)
            except Exception:
                log.exception("recording a CUDA graph failed; decode steps run without graphs")
                self.capture = False
                self.graphs.clear()
                return self._step(cache, rows)[:batch]
        graph, logits = self.graphs[rows]
        graph.replay()
        return logits[:batch]

    def _step(self, cache: SlotCache, rows: int) -> torch.Tensor:
        lean = self.lean
        cache.valid[:rows].index_fill_(1, self.column, True)
        embeds = lean.embedding(self.tokens[:rows, None])  # (R, 1, D), the model's own scale
        writers = [_ColumnWriter(cache, i, rows, self.column) for i in range(len(lean.layers))]
        attend = _FullAttention(
            cache.valid[:rows],
            self.positions[:rows],
            lean.heads,
            lean.kv_heads,
            embeds.dtype,
            lean.windows,
        )
        h = lean.layers_forward(embeds, self.positions[:rows, None], writers, attend)
        return lean.logits(h[:, -1])

    def _record(self, cache: SlotCache, rows: int) -> tuple[Any, torch.Tensor]:
        # Warm-up and capture repeat the real step on the real inputs: writing the same keys and
        # values at the same column again changes nothing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(cache, rows)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(cache, rows)
        return graph, logits
