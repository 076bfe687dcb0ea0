"""Keeps the engine's adapters in step with a folder of adapter folders, without a restart.

Each subfolder of the adapters folder that holds an ``adapter_config.json`` is served as a model
named after the subfolder. A scan adds new folders, removes vanished ones and reloads changed
ones (a change in a file's size or modification time); requests already running on a removed or
replaced adapter finish on the version they started with (the engine's registry pins it). A
folder that cannot be read yet (a copy in progress) is tried again when its files change.

Request model names are only ever looked up among the names a scan found; they never become a
path, so a name like ``../x`` cannot reach outside the folder.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when an adapter folder's files are rewritten."""
    found = []
    for name in ("adapter_config.json", *WEIGHT_FILES):
        try:
            stat = (folder / name).stat()
        except OSError:
            continue
        found.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(found)


class AdapterFolder:
    """Args:
    engine: the engine whose adapters this folder decides.
    root: the adapters folder (None: only ``fixed``).
    reserved: names that are not adapters (the base model's).
    fixed: adapters by name, folders outside ``root`` (Hub downloads), always served.
    """

    def __init__(
        self,
        engine: Any,
        root: str | Path | None,
        reserved: set[str],
        fixed: dict[str, Path] | None = None,
    ) -> None:
        self.engine = engine
        self.root = Path(root) if root is not None else None
        self.fixed = dict(fixed or {})
        """Adapters named on the command line (``serve --adapter NAME=REF``), served beside
        the folder's; a subfolder of the same name is not served."""
        self.reserved = reserved | set(self.fixed)
        self._served: dict[str, tuple[Any, ...]] = {}
        self._failed: dict[str, tuple[Any, ...]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scanned_at = -float("inf")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._served)

    def _candidates(self) -> dict[str, Path]:
        found = dict(self.fixed)
        if self.root is None:
            return found
        try:
            entries = list(self.root.iterdir())
        except OSError as exc:
            log.warning("cannot list adapters folder %s: %s", self.root, exc)
            return found
        for entry in entries:
            # Hidden folders are skipped: a tool writing an adapter atomically writes there first.
            if entry.name.startswith(".") or entry.name in self.reserved:
                continue
            if entry.is_dir() and (entry / "adapter_config.json").is_file():
                found[entry.name] = entry
        return found

    def scan(self, unless_within: float = 0.0) -> None:
        """Bring the engine's adapters in line with the folder now; with ``unless_within``,
        only if the last scan is older than that many seconds (requests for unknown models
        cannot make the server list the folder more often than that)."""
        with self._lock:
            now = time.monotonic()
            if now - self._scanned_at < unless_within:
                return
            self._scanned_at = now
            found = self._candidates()
            for name in [n for n in self._served if n not in found]:
                self._drop(name)
                log.info("adapter %s removed", name)
            for name, folder in sorted(found.items()):
                signature = _signature(folder)
                if self._served.get(name) == signature or self._failed.get(name) == signature:
                    continue
                if name in self._served:
                    self._drop(name)
                try:
                    self.engine.add_adapter(name, folder)
                except Exception as exc:  # noqa: BLE001 - one bad folder never stops the rest
                    self._failed[name] = signature
                    log.warning("adapter %s not served: %s", name, exc)
                    continue
                self._failed.pop(name, None)
                self._served[name] = signature
                log.info("adapter %s served from %s", name, folder)
            for name in [n for n in self._failed if n not in found]:
                del self._failed[name]

    def _drop(self, name: str) -> None:
        del self._served[name]
        try:
            self.engine.remove_adapter(name)
        except Exception as exc:  # noqa: BLE001
            log.warning("adapter %s: %s", name, exc)

    def watch(self, every: float) -> None:
        """Scan every ``every`` seconds on a daemon thread until ``close``."""
        if self._thread is not None or every <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.scan()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("adapter scan failed")

        self._thread = threading.Thread(target=loop, name="softprompt-adapters", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
