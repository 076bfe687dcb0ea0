"""A slot-based KV cache that requests join and leave between decode steps.

Every running request owns one slot (a row of the batch dimension). Rows are right-aligned: all
rows write their next token at the same column ``end``, and a row of length n holds its keys and
values in columns ``end - n .. end - 1``; columns a row does not use are marked invalid and masked
out. That keeps every decode step one batched forward with a shared write column, so:

- a request joins by copying its freshly prefilled keys/values into a free slot (no copy of the
  running rows, unless its prompt is longer than ``end``, when the rows shift right once);
- a request leaves by moving the last slot into its place (one row copied);
- a decode step writes in place; nothing is concatenated (transformers' ``DynamicCache`` copies
  the whole cache every step).

Buffers start small and grow by doubling; when the write column reaches the capacity, columns no
row uses any more are dropped first. ``fit`` gives back what a long request grew, for a decode
step captured over the whole capacity (the engine calls it when rows leave). Tensors live on the
device and in the dtype they are made with, taken from the model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values ``(S, H, C, Dh)``; writes go to rows ``cache.rows``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: SlotCache, index: int) -> None:
        super().__init__()
        self.cache = cache
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        rows, start = cache.rows, cache.end
        stop = start + key_states.shape[-2]
        keys, values = cache.keys[self.index], cache.values[self.index]
        keys[rows, :, start:stop] = key_states
        values[rows, :, start:stop] = value_states
        return keys[rows, :, :stop], values[rows, :, :stop]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.end + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.end

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Keys/values of up to ``slots`` rows, right-aligned at the shared write column ``end``.

    ``valid[s, c]`` says whether column c of slot s holds a real key/value. A forward through the
    model writes its new tokens at columns ``end ..`` of the slots in ``rows`` (set by the caller),
    and ``advance`` then moves ``end`` on.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        slots: int,
        capacity: int = 64,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.shape = (slots, num_heads, max(capacity, 1), head_dim)
        self.initial_capacity = self.shape[2]
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = [self._zeros(keys=True) for _ in range(num_layers)]
        self.values = [self._zeros(keys=False) for _ in range(num_layers)]
        self.valid = torch.zeros(slots, self.shape[2], dtype=torch.bool, device=device)
        self.end = 0
        self.rows = slice(0, 0)
        self.slot_layers = [SlotLayer(self, i) for i in range(num_layers)]
        super().__init__(layers=list(self.slot_layers))

    def _zeros(self, *, keys: bool) -> torch.Tensor:
        """A zeroed ``(S, H, C, Dh)`` buffer; on the CPU keys are laid out ``(S, H, Dh, C)``.

        Attention multiplies queries by the transposed keys; with keys stored transposed that
        product reads them in their natural order (a transposed operand of odd width is slow on
        the CPU). Every index below works on the ``(S, H, C, Dh)`` view either way.
        On a GPU the plain layout stays: cuBLAS reads a transposed operand at full speed, and
        fused attention kernels want the head dimension contiguous.
        Zeros, not empty: masked columns are multiplied by a zero weight, and 0 * NaN is NaN.
        """
        slots, heads, capacity, dim = self.shape
        if keys and self.device.type == "cpu":
            stored = torch.zeros(slots, heads, dim, capacity, dtype=self.dtype, device=self.device)
            return stored.transpose(2, 3)
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    @property
    def slots(self) -> int:
        return self.shape[0]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def mask(self, rows: slice, query_length: int) -> torch.Tensor:
        """Boolean attention mask ``(B, 1, q, end + q)`` for ``query_length`` new tokens per row.

        New token j of a row sees the row's valid columns and the new tokens up to itself. A new
        token that is padding (its column marked invalid by ``mark``) still sees itself, so no
        query row is fully masked (that would give NaN, and NaN keys poison later reads).
        """
        end = self.end
        total = end + query_length
        seen = self.valid[rows, :total]  # (B, end + q)
        columns = torch.arange(total, device=self.device)
        queries = torch.arange(end, total, device=self.device)
        causal = columns[None, :] <= queries[:, None]  # (q, end + q)
        mask = seen[:, None, :] & causal[None]  # (B, q, end + q)
        diagonal = columns[None, :] == queries[:, None]
        return (mask | diagonal[None]).unsqueeze(1)

    def reserve(self, columns: int, live: int) -> None:
        """Make room for ``columns`` more columns after ``end``, keeping slots ``0 .. live - 1``.

        Columns no live row uses are dropped first; the buffers double when that is not enough.
        """
        if self.end + columns <= self.capacity:
            return
        used = self.valid[:live, : self.end].any(dim=0)
        first = int(used.float().argmax()) if bool(used.any()) else self.end
        if first:
            self._shift(live, -first)
        if self.end + columns > self.capacity:
            self._resize(max(2 * self.capacity, self.end + columns))

    def make_room_before(self, length: int, live: int) -> None:
        """Ensure ``end >= length``, so a row that long fits right-aligned (shifts right once)."""
        if length > self.end:
            extra = length - self.end
            if self.end + extra > self.capacity:
                self._resize(max(2 * self.capacity, self.end + extra))
            self._shift(live, extra)

    def place(self, slot: int, source: SlotCache, row: int, length: int) -> None:
        """Copy the last ``length`` columns of ``source``'s row into ``slot``, ending at ``end``."""
        start = self.end - length
        theirs_all = (*source.keys, *source.values)
        for mine, theirs in zip((*self.keys, *self.values), theirs_all, strict=True):
            mine[slot, :, :start] = 0
            mine[slot, :, start : self.end] = theirs[row, :, source.end - length : source.end]
        self.valid[slot] = False
        self.valid[slot, start : self.end] = source.valid[row, source.end - length : source.end]

    def place_block(self, first: int, source: SlotCache, length: int) -> None:
        """``place`` every row of ``source`` at once, row j into slot ``first + j``.

        ``length`` is the longest row's; a shorter row's extra columns in ``source`` were never
        written (zeros, invalid), so they clear the slot's older columns just as ``place`` does.
        """
        count, start = source.slots, self.end - length
        block = slice(first, first + count)
        theirs_all = (*source.keys, *source.values)
        for mine, theirs in zip((*self.keys, *self.values), theirs_all, strict=True):
            mine[block, :, :start] = 0
            mine[block, :, start : self.end] = theirs[:, :, source.end - length : source.end]
        self.valid[block] = False
        self.valid[block, start : self.end] = source.valid[:, source.end - length : source.end]

    def write_prefix(
        self, slots: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        """Put one cached prefix ``(H, n, Dh)`` per layer into every slot of ``slots``, at the
        columns just before ``end`` (one copy per buffer, however many slots share it)."""
        n = keys[0].shape[-2]
        index = torch.tensor(slots, device=self.device)
        for buffer, new in zip((*self.keys, *self.values), (*keys, *values), strict=True):
            buffer[index, :, self.end - n : self.end] = new
        self.valid[index, self.end - n : self.end] = True

    def move(self, source: int, target: int) -> None:
        """Copy slot ``source`` into slot ``target`` (a leaving row's place)."""
        if source == target:
            return
        for buffer in (*self.keys, *self.values):
            buffer[target] = buffer[source]
        self.valid[target] = self.valid[source]

    def mark(self, rows: slice, new_valid: torch.Tensor) -> None:
        """Record which of the ``q`` columns just written hold real tokens (``(B, q)`` bool)."""
        self.valid[rows, self.end : self.end + new_valid.shape[1]] = new_valid

    def advance(self, query_length: int) -> None:
        self.end += query_length

    def reset(self) -> None:
        """Forget every row (the buffers are kept for reuse; ``fit(0)`` gives them back)."""
        self.end = 0
        self.valid.zero_()

    def fit(self, live: int) -> None:
        """After rows left: drop the columns no live row (slots ``0 .. live - 1``) uses, and
        shrink the buffers to the smallest doubling of the initial capacity that holds twice
        what is left, when that at least halves them (so a long request's growth is given back
        without resizing back and forth)."""
        if self.capacity <= self.initial_capacity:
            return
        used = self.valid[:live, : self.end].any(dim=0)
        first = int(used.float().argmax()) if bool(used.any()) else self.end
        target = self.initial_capacity
        while target < 2 * (self.end - first):
            target *= 2
        if 2 * target > self.capacity:
            return
        if first:
            self._shift(live, -first)
        self._resize(target)

    def _shift(self, live: int, by: int) -> None:
        """Move the first ``live`` slots' columns by ``by`` (right if positive), and ``end``."""
        end = self.end
        if by > 0:
            for buffer in (*self.keys, *self.values):
                buffer[:live, :, by : end + by] = buffer[:live, :, :end].clone()
                buffer[:live, :, :by] = 0
            self.valid[:live, by : end + by] = self.valid[:live, :end].clone()
            self.valid[:live, :by] = False
        elif by < 0:
            cut = -by
            for buffer in (*self.keys, *self.values):
                buffer[:live, :, : end - cut] = buffer[:live, :, cut:end].clone()
            self.valid[:live, : end - cut] = self.valid[:live, cut:end].clone()
        self.valid[:live, end + by :] = False
        self.end = end + by

    def _resize(self, capacity: int) -> None:
        """New buffers of ``capacity`` columns holding the first ``min(old, new)`` columns (a
        smaller one only ever when ``end`` fits in it)."""
        slots, heads, old, dim = self.shape
        self.shape = (slots, heads, capacity, dim)
        kept = min(old, capacity)
        for buffers, keys in ((self.keys, True), (self.values, False)):
            for i, buffer in enumerate(buffers):
                resized = self._zeros(keys=keys)
                resized[:, :, :kept] = buffer[:, :, :kept]
                buffers[i] = resized
        valid = torch.zeros(slots, capacity, dtype=torch.bool, device=self.device)
        valid[:, :kept] = self.valid[:, :kept]
        self.valid = valid
