"""The CPU decode path chosen by measuring this machine, not assumed from another.

The lean forward has switches whose worth depends on the CPU: how its linear layers run
(oneDNN on packed weights; MKL's sgemm on weights packed for a full decode batch,
``PackedLinear.full_batch``; or the C kernel's panel linear, ``cpu_kernels.py``) and the fused C
kernels for attention, RMSNorm and SwiGLU. Which is fastest differs between CPUs (figures in
docs/benchmarks/engine.md), so it is measured, not assumed. ``tune`` times a few full
decode steps of the real model on each combination and keeps the fastest. The decision is
cached in ``$SOFTPROMPT_CACHE/engine-paths.json`` under a key of the CPU (model name and the
instruction-set flags that matter), the torch version, the thread count, the model's shape and
the candidates, so the next start reads it instead of measuring (delete the file to measure
again, e.g. after a measurement on a busy machine).

Forcing a path: ``EngineConfig.full_batch_pack`` / ``cpu_kernels`` / ``panel_linear`` (True or
False), or the environment: ``SOFTPROMPT_FULL_BATCH_PACK=0|1``, ``SOFTPROMPT_CPU_KERNELS=0|1``,
``SOFTPROMPT_PANEL_LINEAR=0|1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "asimd", "sve")
"""The CPU flags that change which kernels are fast."""
CACHE_FILE = "engine-paths.json"
ENV_PACK = "SOFTPROMPT_FULL_BATCH_PACK"
ENV_PANELS = "SOFTPROMPT_PANEL_LINEAR"
ENV_RETUNE = "SOFTPROMPT_RETUNE"


@dataclass(frozen=True)
class DecodePath:
    """One combination of the switches."""

    full_batch_pack: bool
    cpu_kernels: bool
    panel_linear: bool = False
    """Linear layers on the C kernel's panel layout (``cpu_kernels.py``) instead of oneDNN/MKL."""
    bfloat16: bool = False
    """Linear layers multiply in bfloat16 on oneDNN (``PackedLinear.dtype``), not float32, and
    the KV cache is bfloat16 (half the bytes attention reads; its arithmetic stays float32)."""

    def label(self) -> str:
        if self.panel_linear:
            linear = "C panel linears"
        elif self.bfloat16:
            linear = "oneDNN bfloat16 with a bfloat16 KV cache"
        else:
            linear = "MKL at full batch" if self.full_batch_pack else "oneDNN"
        return f"{linear}, {'fused C kernels' if self.cpu_kernels else 'PyTorch ops'}"


@dataclass
class Decision:
    """The path picked and the timings behind it (ms per full decode step, median)."""

    picked: DecodePath
    timings: dict[str, float]
    """``DecodePath.label()`` -> milliseconds."""
    measured: bool
    """False when read from the cache (or forced), True when timed now."""
    key: str = ""

    def summary(self) -> str:
        if not self.timings:
            return f"decode path: {self.picked.label()} (as configured, not measured)"
        times = ", ".join(f"{label} {ms:.1f} ms" for label, ms in self.timings.items())
        where = "measured now" if self.measured else "measured earlier on this machine"
        return f"decode path: {self.picked.label()} ({where}; per full decode step: {times})"


def cpu_signature() -> dict[str, Any]:
    """The CPU as it matters for kernel speed: model name and the relevant flags."""
    from ..device import cpu_info

    name, flags = cpu_info()
    return {
        "model": name or platform.processor() or platform.machine(),
        "flags": sorted(f for f in FLAGS if f in (flags or ())),
    }


def cache_key(
    model_shape: Sequence[int | str], max_batch: int, candidates: Sequence[DecodePath] = ()
) -> str:
    """What the decision depends on, hashed: CPU, torch, threads, model shape, batch, and the
    paths it chose among (a new candidate is measured, not ruled out by an old decision)."""
    parts = {
        "cpu": cpu_signature(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": list(model_shape),
        "batch": max_batch,
    }
    if candidates:
        parts["candidates"] = sorted(p.label() for p in candidates)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def forced(name: str, configured: bool | None) -> bool | None:
    """A switch as the config or the environment sets it (None: to be measured)."""
    if configured is not None:
        return configured
    value = os.environ.get(name)
    if value in ("0", "1"):
        return value == "1"
    return None


def pick(timings: dict[DecodePath, float]) -> DecodePath:
    """The fastest path; a tie (within 2%) goes to float32 over bfloat16 (exact), then to the
    one with fewer extras (less memory, fewer moving parts): oneDNN over MKL and over the panel
    linears, then the kernels over none (they save memory traffic and were never slower where
    measured)."""
    best = min(timings.values())
    near = [p for p, t in timings.items() if t <= best * 1.02]
    return min(
        near,
        key=lambda p: (
            p.bfloat16,
            p.full_batch_pack,
            p.panel_linear,
            not p.cpu_kernels,
            timings[p],
        ),
    )


def read_cached(folder: Path, key: str) -> Decision | None:
    try:
        record = json.loads((folder / CACHE_FILE).read_text()).get(key)
        return Decision(DecodePath(**record["picked"]), dict(record["timings"]), False, key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cached(folder: Path, decision: Decision) -> None:
    """Add ``decision`` to the cache file (best effort: an unwritable cache only costs a
    measurement at the next start)."""
    from ..files import write_text

    path = folder / CACHE_FILE
    try:
        records = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}
    records[decision.key] = {
        "picked": asdict(decision.picked),
        "timings": decision.timings,
        "cpu": cpu_signature(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(records, indent=1) + "\n")
    except OSError:
        pass


def time_steps(step: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def decide(
    candidates: Sequence[DecodePath],
    measure: Callable[[DecodePath], float],
    key: str,
    folder: Path | None,
    rounds: int = 2,
    retune: bool = False,
) -> Decision:
    """The cached decision for ``key``, else each candidate measured ``rounds`` times in turn
    and the fastest kept (and cached). One candidate is taken as it is, unmeasured.
    ``retune``: measure even when a decision is cached (one measured on a busy machine, or
    before a change the key cannot see), and cache the new one in its place."""
    if len(candidates) == 1:
        return Decision(candidates[0], {}, False, key)
    if folder is not None and not retune:
        cached = read_cached(folder, key)
        if cached is not None and cached.picked in candidates:
            return cached
    # Round-robin, best of each: a machine whose speed drifts (a neighbour starting work) then
    # slows every candidate alike instead of whichever ran last.
    runs: dict[DecodePath, list[float]] = {p: [] for p in candidates}
    for _ in range(rounds):
        for path in candidates:
            runs[path].append(measure(path))
    timings = {p: min(t) for p, t in runs.items()}
    decision = Decision(pick(timings), {p.label(): round(t, 2) for p, t in timings.items()}, True)
    decision.key = key
    if folder is not None:
        write_cached(folder, decision)
    return decision
