"""Keys and values of prompt text, kept between requests and reused (a prefix cache for text).

A request whose prompt starts like an earlier one (a system prompt, a few-shot block, a document
asked about twice, the earlier turns of a chat) takes those tokens' keys and values from here
instead of computing them again. What the keys and values of a text token are depends on every
token before it, the adapter's virtual tokens included, so entries are keyed by a chain: block i
of a prompt is found under a digest of (the adapter, the first ``(i + 1) * block`` token ids), and
a prompt reuses its blocks from the first on, up to the first one missing.

Blocks are whole (``block`` tokens each; a prompt's tail shorter than a block is not kept), live
on the model's device in its dtype, and are evicted least recently used once their bytes pass
``max_bytes``. A lookup touches a chain's blocks from the last to the first, so a chain's first
blocks are the last of it to go (they are the ones other prompts share).

Plain tensors and an ``OrderedDict``; only the engine's step thread uses it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Block:
    """One block's keys and values, per layer: ``(layers, H, block, Dh)`` each."""

    keys: torch.Tensor
    values: torch.Tensor

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class PrefixCacheStats:
    """Counters since the engine started (read by ``/metrics`` and the benchmarks)."""

    queried_tokens: int = 0
    """Prompt tokens looked up (every prompt token that could be reused)."""
    hit_tokens: int = 0
    """Prompt tokens whose keys/values were reused instead of computed."""
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def chain_keys(owner: bytes, ids: list[int], block: int, blocks: int) -> list[bytes]:
    """The keys of a prompt's first ``blocks`` blocks: each a digest of the one before and its
    own token ids, the first of ``owner`` (who computed the keys before the text: an adapter)."""
    keys = []
    last = hashlib.blake2b(owner, digest_size=16).digest()
    for i in range(blocks):
        h = hashlib.blake2b(last, digest_size=16)
        h.update(
            torch.tensor(ids[i * block : (i + 1) * block], dtype=torch.int64).numpy().tobytes()
        )
        last = h.digest()
        keys.append(last)
    return keys


class PrefixCache:
    """Blocks of prompt keys/values, least recently used evicted past ``max_bytes``.

    Args:
        block: tokens per block.
        max_bytes: memory for blocks at most; 0 turns the cache off (nothing kept, nothing found).
    """

    def __init__(self, block: int, max_bytes: int) -> None:
        if block < 1:
            raise ValueError("a prefix cache block holds at least one token")
        if max_bytes < 0:
            raise ValueError("the prefix cache's memory cannot be negative")
        self.block = block
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.nbytes = 0
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, owner: bytes, ids: list[int], limit: int) -> list[Block]:
        """The blocks of ``ids`` kept, from the first on, covering at most ``limit`` tokens."""
        if not self.enabled:
            return []
        usable = max(0, min(limit, len(ids))) // self.block
        self.stats.queried_tokens += max(0, min(limit, len(ids)))
        if not usable:
            return []
        found = []
        for key in chain_keys(owner, ids, self.block, usable):
            entry = self.blocks.get(key)
            if entry is None:
                break
            found.append((key, entry))
        for key, _ in reversed(found):  # the chain's first blocks become the most recent
            self.blocks.move_to_end(key)
        self.stats.hit_tokens += len(found) * self.block
        return [entry for _, entry in found]

    def store(
        self, owner: bytes, ids: list[int], have: int, keys: list[torch.Tensor],
        values: list[torch.Tensor], column: int,
    ) -> None:  # fmt: skip
        """Keep the whole blocks of ``ids`` past the first ``have`` tokens (already kept).

        ``keys[l]``/``values[l]`` are layer l's ``(H, C, Dh)`` for one row, prompt token i at
        column ``column + i``.
        """
        if not self.enabled:
            return
        blocks = len(ids) // self.block
        first = have // self.block
        if blocks <= first:
            return
        chain = chain_keys(owner, ids, self.block, blocks)
        new: list[tuple[bytes, Block]] = []
        for i in range(first, blocks):
            key = chain[i]
            if key in self.blocks:
                continue
            start = column + i * self.block
            span = slice(start, start + self.block)
            entry = Block(
                keys=torch.stack([k[:, span] for k in keys]),
                values=torch.stack([v[:, span] for v in values]),
            )
            if entry.nbytes() > self.max_bytes:
                return
            new.append((key, entry))
        for key, entry in reversed(new):  # parents more recent than children, as in lookup
            self.blocks[key] = entry
            self.nbytes += entry.nbytes()
            self.stats.stored_blocks += 1
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self.blocks:
            _, entry = self.blocks.popitem(last=False)
            self.nbytes -= entry.nbytes()
            self.stats.evicted_blocks += 1


def joined(blocks: list[Block]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Blocks laid end to end: per layer ``(H, n * block, Dh)`` keys and values."""
    keys = torch.cat([b.keys for b in blocks], dim=2)
    values = torch.cat([b.values for b in blocks], dim=2)
    return list(keys.unbind(0)), list(values.unbind(0))
