"""Where the model runs and in what precision: ``--device`` and ``--dtype``.

Every tensor softprompt makes follows the model's device (nothing names a device but this
module), so a command picks its device and dtype once, here, when the model loads. ``auto``
means a CUDA GPU in bfloat16 when PyTorch sees one, else the CPU in float32. Prompt rows and
their optimizer stay float32 whatever the model's dtype, and adapter files are float32 on disk.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_name(value: str) -> str:
    """argparse type for ``--device``: checks the spelling only (no torch import)."""
    value = value.strip().lower()
    if not _DEVICE.match(value):
        import argparse

        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use {DEVICE_CHOICES}")
    return value


def resolve_device(name: str = "auto") -> torch.device:
    """The device ``name`` means here.

    Raises:
        UserError: a CUDA device was asked for and PyTorch sees none (or not that many).
    """
    import torch

    name = device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this PyTorch was built without CUDA (install a CUDA build of torch)"
                if torch.version.cuda is None
                else "no GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise UserError(f"--device {name}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"--device {name}: only {count} GPU{'s' if count != 1 else ''} visible "
                f"(cuda:0..cuda:{count - 1})"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``name`` means on ``device``: ``auto`` is bfloat16 on a GPU that supports it,
    float32 otherwise (the CPU path is exact in float32, and fastest there on most CPUs).

    Raises:
        UserError: an unknown name, or bfloat16 on a GPU without it.
    """
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: use {', '.join(DTYPES)}")
    if device.type == "cuda":
        with torch.cuda.device(device):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if name == "auto":
            return torch.bfloat16 if bf16 else torch.float32
        if name == "bfloat16" and not bf16:
            gpu = torch.cuda.get_device_name(device)
            raise UserError(f"--dtype bfloat16: {gpu} does not support it; use --dtype float32")
    if name == "auto":
        return torch.float32
    if name == "bfloat16" and device.type == "cpu" and native_cpu_bf16() is False:
        log.warning(
            "--dtype bfloat16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so "
            "bfloat16 runs on slow conversions: the engine was about 6x slower than in float32 "
            "on an AVX2 AMD EPYC (docs/benchmarks/engine.md); float32 is the fast choice here"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str] | None]:
    """This CPU's model name and instruction-set flags (x86 ``flags``, Arm ``Features``) as
    ``/proc/cpuinfo`` gives them; None for what it does not say (or where it cannot be read)."""
    name, flags = None, None
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line and name is None:
            name = line.split(":", 1)[1].strip()
        elif line.startswith(("flags", "Features")) and ":" in line and flags is None:
            flags = set(line.split(":", 1)[1].split())
    return name, flags


def native_cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU has bfloat16 arithmetic instructions (x86 AVX512-BF16 or AMX, Arm BF16);
    None where its flags cannot be read."""
    flags = cpu_info(cpuinfo)[1]
    return None if flags is None else bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``resolve_device`` then ``resolve_dtype`` on it."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch running out of device memory (any device)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """``cuda:0 (NVIDIA H200), bfloat16``-style text for logs and reports."""
    import torch

    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return f"{where}, {str(dtype).removeprefix('torch.')}"
