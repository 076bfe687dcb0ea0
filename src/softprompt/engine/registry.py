"""Adapters the engine can serve, and which of them are resident.

To the model runner an adapter is a KV prefix: the keys/values its virtual tokens produce at
positions 0..n-1, the same for every request, so they are computed once and reused. A resident
adapter costs its rows and that prefix; the base model is shared. At most ``max_resident``
adapters stay resident: the least recently used one that no running request holds is dropped
first (an adapter read from a folder is read again when next needed). A request pins its adapter
from submission (``claim``) to its end, so it is never freed under it, even when the adapter is
removed while the request waits or runs: it finishes on the version it was submitted with.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import Adapter, load_adapter
from .sampling import RequestError


@dataclass
class Prefix:
    """Per-layer keys and values ``(H, n, Dh)`` of an adapter's n virtual tokens."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    owner: bytes = b""
    """A digest of what made them (the adapter's method and rows; empty for none): the prefix
    cache keys text computed after them by it."""

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(eq=False)
class AdapterEntry:
    """One named adapter in the registry: where its rows come from (a folder, or given in
    memory), its prefix once computed, and how many requests pin it. ``claim`` pins it and
    hands it to the request (its lease); ``release`` gives the hold back."""

    name: str
    path: Path | None
    adapter: Adapter | None
    length: int = 0
    """Virtual tokens: the prefix's length."""
    prefix: Prefix | None = None
    version: int = -1
    pins: int = 0
    removed: bool = False


class AdapterRegistry:
    """Named adapters, each from a folder or given in memory; thread-safe.

    Args:
        build_prefixes: computes adapters' prefixes, several in one run (the model runner's job).
        check: raises ``RequestError`` for an adapter this model cannot serve.
        max_resident: how many prefixes stay in memory at most (pinned ones may exceed it).
    """

    def __init__(
        self,
        build_prefixes: Callable[[list[Adapter]], list[Prefix]],
        check: Callable[[Adapter], None],
        max_resident: int = 64,
    ) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self._build = build_prefixes
        self._check = check
        self.max_resident = max_resident
        self._entries: dict[str, AdapterEntry] = {}
        self._resident: OrderedDict[str, AdapterEntry] = OrderedDict()
        self._lock = threading.RLock()

    def add(self, name: str, source: Adapter | str | Path) -> None:
        """Make ``name`` servable: an adapter in memory (its live rows) or a folder read now.

        Raises:
            RequestError: the name is taken, or the adapter cannot run on this model.
        """
        with self._lock:
            if name in self._entries:
                raise RequestError(f"an adapter named {name!r} is already registered")
        if isinstance(source, Adapter):
            self._check(source)
            entry = AdapterEntry(name, None, source, length=source.num_virtual_tokens)
        else:
            path = Path(source)
            # Read now to refuse a bad folder at once; read again when it becomes resident.
            length = self._read(name, path).num_virtual_tokens
            entry = AdapterEntry(name, path, None, length=length)
        with self._lock:
            self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Stop serving ``name``; requests already running on it finish first."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.removed:
                raise RequestError(f"no adapter named {name!r} is registered")
            entry.removed = True
            del self._entries[name]
            if entry.pins == 0 and self._resident.get(name) is entry:
                del self._resident[name]
                entry.prefix = None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def length(self, name: str) -> int:
        """Virtual tokens of ``name`` (its prefix length)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise RequestError(f"unknown adapter {name!r}")
            return entry.length

    def source(self, name: str) -> Adapter | Path:
        """What ``name`` was added from: the ``Adapter`` given in memory, or its folder."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise RequestError(f"unknown adapter {name!r}")
            if entry.path is not None:
                return entry.path
            assert entry.adapter is not None  # given in memory: kept for good
            return entry.adapter

    def resident(self) -> list[str]:
        """Names with a prefix in memory, least recently used first."""
        with self._lock:
            return list(self._resident)

    def nbytes(self) -> int:
        """Memory held by resident prefixes and rows."""
        with self._lock:
            entries = list(self._resident.values())
        total = 0
        for entry in entries:
            if entry.prefix is not None:
                total += entry.prefix.nbytes()
            if entry.adapter is not None:
                total += entry.adapter.weights.numel() * entry.adapter.weights.element_size()
        return total

    def claim(self, name: str) -> AdapterEntry:
        """Pin ``name`` for a request from its submission; its rows are read now if they are not
        in memory, so a later removal of the adapter (or its folder) cannot fail the request.
        ``prepare`` computes the prefix when the request runs; ``release`` ends the hold.

        Raises:
            RequestError: no such adapter, or it cannot be read any more.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise RequestError(f"unknown adapter {name!r}", field="adapter")
            entry.pins += 1  # from here on nothing frees its rows
            path = entry.path if entry.adapter is None else None
        if path is None:
            return entry
        try:
            adapter = self._read(entry.name, path)  # outside the lock: a slow disk stalls no one
        except BaseException:
            self.release(entry)
            raise
        with self._lock:
            if entry.adapter is None:  # another claim may have read it meanwhile
                entry.adapter = adapter
        return entry

    def prepare(self, lease: AdapterEntry) -> None:
        """Compute a claimed adapter's prefix if it is missing or stale, and mark it resident.

        Raises:
            RequestError: the adapter cannot run on this model.
        """
        self._ensure(lease)
        with self._lock:
            if not lease.removed:
                self._resident[lease.name] = lease
                self._resident.move_to_end(lease.name)
            self._evict()

    def warm(self, leases: Iterable[AdapterEntry]) -> None:
        """Compute in one batched run the prefixes that ``leases`` lack, for the ``prepare``
        calls that follow (joining requests of several new adapters then cost one forward, not
        one each). Any failure is left for ``prepare`` to meet, one adapter at a time."""
        with self._lock:
            entries = list({id(lease): lease for lease in leases}.values())
        todo: list[tuple[AdapterEntry, Adapter, int]] = []
        for entry in entries:
            try:
                stale = self._stale(entry)
            except RequestError:
                continue
            if stale is not None:
                todo.append((entry, *stale))
        if len(todo) < 2:
            return
        try:
            prefixes = self._build([adapter for _, adapter, _ in todo])
        except Exception:  # noqa: BLE001 - acquire builds each alone and reports its error
            return
        for (entry, _, version), prefix in zip(todo, prefixes, strict=True):
            entry.prefix, entry.version = prefix, version

    def release(self, lease: AdapterEntry) -> None:
        """Give back one request's hold; a removed adapter is freed with its last hold."""
        with self._lock:
            lease.pins = max(0, lease.pins - 1)
            if lease.removed and lease.pins == 0:
                if self._resident.get(lease.name) is lease:
                    del self._resident[lease.name]
                lease.prefix = None
            if (
                lease.pins == 0
                and lease.path is not None
                and self._resident.get(lease.name) is not lease
            ):
                lease.adapter = None  # claimed but never run: its rows are read again if needed
            self._evict()

    def _ensure(self, entry: AdapterEntry) -> None:
        stale = self._stale(entry)
        if stale is not None:
            adapter, version = stale
            entry.prefix, entry.version = self._build([adapter])[0], version

    def _stale(self, entry: AdapterEntry) -> tuple[Adapter, int] | None:
        """The adapter (read from its folder if needed) and its rows' version, when its prefix
        is missing or older than its rows; None when the prefix is current."""
        if entry.adapter is None:
            assert entry.path is not None
            entry.adapter = self._read(entry.name, entry.path)
        version = entry.adapter.weights._version
        if entry.prefix is None or entry.version != version:
            return entry.adapter, version
        return None

    def _read(self, name: str, path: Path) -> Adapter:
        """The adapter in folder ``path``, checked against the model; any failure is its own."""
        try:
            adapter = load_adapter(path, name=name, hub=False)  # a folder, never a Hub id
        except Exception as exc:  # noqa: BLE001 - any load failure is that adapter's alone
            raise RequestError(f"adapter {name!r}: {exc}") from exc
        self._check(adapter)
        return adapter

    def _evict(self) -> None:
        """Drop least recently used, unpinned prefixes beyond ``max_resident`` (lock held)."""
        over = len(self._resident) - self.max_resident
        for name, entry in list(self._resident.items()):
            if over <= 0:
                break
            if entry.pins == 0:
                del self._resident[name]
                entry.prefix = None
                if entry.path is not None:
                    entry.adapter = None
                over -= 1
