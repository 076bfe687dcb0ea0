"""The fused CPU kernels of ``cpu_kernels.c``, compiled on first use and called through ctypes.

PyTorch has no CPU kernel for what a decode step over the slot cache needs in one pass:
grouped-query attention of one new token per row over that row's valid cache columns, with the
rotary embedding and the cache write of the new key/value folded in. Its batched products read
every row's whole window and the transposed key write is a slow strided copy; RMSNorm and SwiGLU
are chains of small elementwise kernels. Measured on this project's 2-core machine (embedded
model, 64 rows): see the README's engine benchmark.

The C file compiles with the system's C compiler (``$CC``, else ``cc``) in about ten seconds, for
this CPU (``-march=native``), into the softprompt cache (``$SOFTPROMPT_CACHE/kernels``), named by
a hash of the source, the compiler, its flags and the CPU, so a change to any of them gets its
own build. Without a compiler, or with ``SOFTPROMPT_CPU_KERNELS=0``, ``load()`` gives ``None``
and the engine runs PyTorch's kernels instead (same results up to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ENV = "SOFTPROMPT_CPU_KERNELS"

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


class CpuKernels:
    """The compiled library; every method takes float32 CPU tensors and checks their layout."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self.path = path
        self._attention = lib.sp_decode_attention
        self._attention.restype = None
        self._attention.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr]
        self._attention.argtypes += [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64]
        self._attention.argtypes += [_ptr, _i64, _i64, _f32, _i64, _i64, _f32]
        self._attention.argtypes += [_ptr, _ptr, _f32, _ptr, _int, _int, _int]
        self._normalise = lib.sp_add_normalise
        self._normalise.restype = None
        self._normalise.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _f32, _ptr, _int, _int, _int]
        self._silu_mul = lib.sp_silu_mul
        self._silu_mul.restype = None
        self._silu_mul.argtypes = [_ptr, _ptr, _i64, _i64, _int, _int, _int]
        self._softcap = lib.sp_softcap
        self._softcap.restype = None
        self._softcap.argtypes = [_ptr, _i64, _f32, _int]
        self._panel_linear = lib.sp_panel_linear
        self._panel_linear.restype = None
        self._panel_linear.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _int]

    def add_normalise(
        self,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        eps: float,
        out: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``h += delta`` in place (when given), then ``h * rsqrt(mean(h²) + eps)`` per row,
        times ``weight`` (D,) when given (into ``out`` when given)."""
        _check(h, *(() if delta is None else (delta,)))
        if delta is not None and delta.shape != h.shape:
            raise ValueError("add_normalise: h and delta differ in shape")
        out = _output(out, h, h.shape)
        rows, dim = h.shape
        pointer = None if delta is None else delta.data_ptr()
        scale = None if weight is None else _vector(weight, dim).data_ptr()
        self._normalise(
            h.data_ptr(), pointer, out.data_ptr(), rows, dim, eps, scale, 0, 0,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def silu_mul(
        self, gate_up: torch.Tensor, out: torch.Tensor | None = None, gelu: bool = False
    ) -> torch.Tensor:
        """(B, 2W) holding gate then up → ``silu(gate) * up`` (B, W), into ``out`` if given;
        with ``gelu``, GELU's tanh approximation instead of SiLU (GeGLU)."""
        _check(gate_up)
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = _output(out, gate_up, (rows, width))
        self._silu_mul(
            gate_up.data_ptr(), out.data_ptr(), rows, width, int(gelu), 0,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def softcap(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        """``x = cap * tanh(x / cap)`` in place on a contiguous float32 (rows, n) tensor."""
        _check(x)
        self._softcap(x.data_ptr(), x.numel(), cap, torch.get_num_threads())
        return x

    def panel_linear(
        self, x: torch.Tensor, panels: torch.Tensor, out_features: int
    ) -> torch.Tensor:
        """``x @ W.T`` for x (..., K), W (out_features, K) laid out by ``weight_panels``."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError("CPU kernels take float32 CPU tensors")
        in_features = x.shape[-1]
        if panels.shape != (-(-out_features // 16), in_features, 16):
            raise ValueError("panel_linear: panels do not match x and out_features")
        x = x.contiguous()
        out = x.new_empty(*x.shape[:-1], out_features)
        rows = x.numel() // in_features if in_features else 0
        if rows:
            self._panel_linear(
                x.data_ptr(), rows, in_features, panels.data_ptr(), out_features,
                out.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        return out


def weight_panels(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight (N, K) laid out for ``panel_linear``: (ceil(N / 16), K, 16), panel p
    holding output columns 16p .. 16p+15 row by row along K (zero columns pad the last)."""
    n, k = weight.shape
    count = -(-n // 16)
    padded = weight.detach().new_zeros(count * 16, k, dtype=torch.float32)
    padded[:n] = weight.detach()
    return padded.view(count, 16, k).transpose(1, 2).contiguous()


class DecodeStep:
    """One decode step's kernels over one cache, checked once for the step, not per call.

    A step calls the kernels about a hundred times on tensors of the same few shapes; checking
    every argument on every call cost about 45 us of Python each (measured), several percent of
    a step. Here the cache layout, the rotary factors and the row range are checked once; each
    call then checks only that its one new tensor has the shape and layout expected.
    """

    def __init__(
        self,
        kernels: CpuKernels,
        cache_keys: list[torch.Tensor],
        cache_values: list[torch.Tensor],
        valid: torch.Tensor,
        rows: slice,
        end: int,
        rotaries: dict[Any, tuple[torch.Tensor, torch.Tensor]],
        heads: int,
    ) -> None:
        keys, values = cache_keys[0][rows], cache_values[0][rows]
        batch, kv_heads, capacity, dim = keys.shape
        # Every layer's buffers must share layer 0's layout (the kernel is handed only offsets
        # and layer 0's strides); the full checks below then run on layer 0's slots.
        for k, v in zip(cache_keys, cache_values, strict=True):
            if k.shape != cache_keys[0].shape or k.stride() != cache_keys[0].stride():
                raise ValueError("decode step: the cache's layers differ in layout")
            if v.shape != cache_values[0].shape or v.stride() != cache_values[0].stride():
                raise ValueError("decode step: the cache's layers differ in layout")
            _check_buffer(k, keys.dtype)
            _check_buffer(v, keys.dtype)
        qkv_shape = (batch, (heads + 2 * kv_heads) * dim)
        for cos, sin in rotaries.values():
            _check_attention(qkv_shape, cos, sin, keys, values, valid[rows], end, heads)
        self.kernels, self.heads, self.end, self.threads = (
            kernels,
            heads,
            end,
            torch.get_num_threads(),
        )
        self.batch, self.kv_heads, self.dim = batch, kv_heads, dim
        self.qkv_shape = torch.Size(qkv_shape)
        self.keys, self.values = cache_keys, cache_values
        self.key_offset = rows.start * keys.stride(0) * keys.element_size()
        self.value_offset = rows.start * values.stride(0) * values.element_size()
        self.half = int(keys.dtype == torch.bfloat16)
        """Whether the cache holds bfloat16 (the kernel widens it to float32 as it reads)."""
        self.key_strides = (keys.stride(0), keys.stride(1), keys.stride(3))
        self.value_strides = (values.stride(0), values.stride(1), values.stride(2))
        row_valid = valid[rows]
        self.valid = (row_valid.data_ptr(), row_valid.stride(0))
        self._rotaries = rotaries  # kept alive: the kernel reads them by address
        self.rotary = {
            key: (cos.data_ptr(), sin.data_ptr(), cos.shape[1])
            for key, (cos, sin) in rotaries.items()
        }

    def attention(
        self,
        layer: int,
        qkv: torch.Tensor,
        scaling: float,
        out: torch.Tensor,
        options: AttentionOptions | None = None,
    ) -> None:
        """``decode_attention`` for cache layer ``layer``, into ``out`` (B, H·Dh), with the
        layer's ``options`` (its rotary among the step's, window, soft cap, q/k norms). qkv and
        out are both float32 or both bfloat16 (the bfloat16 path's linear layers)."""
        _expect(qkv, self.qkv_shape, _WIDTHS)
        _expect(out, (self.batch, self.heads * self.dim), (qkv.dtype,))
        options = options or _PLAIN
        cos, sin, rotary_dim = self.rotary[options.rotary]
        self.kernels._attention(
            qkv.data_ptr(),
            self.batch,
            self.heads,
            self.kv_heads,
            self.dim,
            cos,
            sin,
            self.keys[layer].data_ptr() + self.key_offset,
            *self.key_strides,
            self.values[layer].data_ptr() + self.value_offset,
            *self.value_strides,
            *self.valid,
            self.end,
            scaling,
            rotary_dim,
            options.window,
            options.softcap,
            options.q_norm_pointer,
            options.k_norm_pointer,
            options.qk_eps,
            out.data_ptr(),
            self.half,
            int(qkv.dtype == torch.bfloat16),
            self.threads,
        )

    def add_normalise(
        self,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        eps: float,
        out: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> None:
        """``CpuKernels.add_normalise`` on (B, D) tensors of one shape (``weight``: a contiguous
        float32 (D,) vector, checked by its owner); h is float32, delta and out float32 or
        bfloat16 (read widened, written rounded)."""
        _expect(out, h.shape, _WIDTHS)
        if delta is not None:
            _expect(delta, h.shape, _WIDTHS)
        _expect(h, out.shape)
        rows, dim = h.shape
        pointer = None if delta is None else delta.data_ptr()
        scale = None if weight is None else weight.data_ptr()
        half_delta = int(delta is not None and delta.dtype == torch.bfloat16)
        half_out = int(out.dtype == torch.bfloat16)
        self.kernels._normalise(
            h.data_ptr(), pointer, out.data_ptr(), rows, dim, eps, scale, half_delta, half_out,
            self.threads,
        )  # fmt: skip

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor, gelu: bool = False) -> None:
        """``CpuKernels.silu_mul`` into ``out`` (B, W) from gate_up (B, 2W), both float32 or
        both bfloat16."""
        rows, width = out.shape
        _expect(gate_up, (rows, 2 * width), _WIDTHS)
        _expect(out, out.shape, (gate_up.dtype,))
        half = int(gate_up.dtype == torch.bfloat16)
        self.kernels._silu_mul(
            gate_up.data_ptr(), out.data_ptr(), rows, width, int(gelu), half, self.threads
        )


@dataclass(frozen=True)
class AttentionOptions:
    """What a decoder family changes in one layer's decode attention (none: Llama's)."""

    rotary: Any = None
    """Which of the step's rotary tables the layer uses (Gemma 3: local or global)."""
    window: int = 0
    """Sliding window in positions, the new one included (0: none)."""
    softcap: float = 0.0
    """Scores become ``softcap * tanh(scores / softcap)`` (0: none; Gemma 2)."""
    q_norm: torch.Tensor | None = None
    """Per-head RMSNorm weights (Dh,) of q and k, offset applied (Qwen3, Gemma 3)."""
    k_norm: torch.Tensor | None = None
    qk_eps: float = 0.0

    def __post_init__(self) -> None:
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                _vector(norm, norm.shape[0])

    @property
    def q_norm_pointer(self) -> int | None:
        return None if self.q_norm is None else self.q_norm.data_ptr()

    @property
    def k_norm_pointer(self) -> int | None:
        return None if self.k_norm is None else self.k_norm.data_ptr()


_PLAIN = AttentionOptions()


def _check_attention(
    qkv_shape: Any,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    end: int,
    heads: int,
) -> None:
    """Everything ``sp_decode_attention`` relies on about its arguments (it checks nothing)."""
    _check(cos, sin)
    _check_buffer(keys, keys.dtype)
    _check_buffer(values, keys.dtype)
    batch, kv_heads, capacity, dim = keys.shape
    if not (0 <= end < capacity) or keys.stride(2) != 1 or values.stride(3) != 1:
        raise ValueError("decode_attention: cache column out of range or unexpected layout")
    if tuple(qkv_shape) != (batch, (heads + 2 * kv_heads) * dim):
        raise ValueError("decode_attention: qkv has the wrong shape")
    if cos.shape[0] != batch or not (0 < cos.shape[1] <= dim) or cos.shape[1] % 2:
        raise ValueError("decode_attention: cos has the wrong shape")
    if sin.shape != cos.shape or valid.shape[0] != batch or valid.shape[1] <= end:
        raise ValueError("decode_attention: sin or valid has the wrong shape")
    if valid.stride(1) != 1 or valid.device.type != "cpu":
        raise ValueError("decode_attention: valid's columns must be contiguous, on the CPU")
    if valid.dtype != torch.bool or values.shape != keys.shape or heads % kv_heads:
        raise ValueError("decode_attention: valid must be bool, values shaped like keys")


_WIDTHS = (torch.float32, torch.bfloat16)
"""What a decode step's activations and KV cache may be in (bfloat16: the bfloat16 path)."""


def _expect(
    t: torch.Tensor, shape: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> None:
    """The cheap per-call check: one of ``dtypes``, contiguous, this shape (the device is the
    step's)."""
    if t.shape != shape or t.dtype not in dtypes or not t.is_contiguous():
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"decode step: expected a contiguous {names} {tuple(shape)} tensor")


def _vector(t: torch.Tensor, size: int) -> torch.Tensor:
    """A weight vector the kernels read by address: float32, contiguous, (size,), on the CPU."""
    if t.shape != (size,) or t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"CPU kernels take a contiguous float32 ({size},) weight vector")
    if t.device.type != "cpu":
        raise ValueError("CPU kernels take CPU tensors")
    return t


def _check_buffer(t: torch.Tensor, dtype: torch.dtype) -> None:
    """A KV cache buffer: on the CPU, float32 or bfloat16, all of them in ``dtype``."""
    if t.device.type != "cpu" or t.dtype not in _WIDTHS:
        raise ValueError("the CPU kernels' KV cache is float32 or bfloat16, on the CPU")
    if t.dtype != dtype:
        raise ValueError("the CPU kernels' KV cache buffers differ in dtype")


def _output(out: torch.Tensor | None, like: torch.Tensor, shape: Any) -> torch.Tensor:
    if out is None:
        return like.new_empty(shape)
    _check(out)
    if out.shape != shape:
        raise ValueError(f"output buffer is {tuple(out.shape)}, expected {tuple(shape)}")
    return out


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("CPU kernels take contiguous float32 CPU tensors")
        if t.dim() != 2:
            raise ValueError("CPU kernels take (rows, features) tensors")


@functools.cache
def load() -> CpuKernels | None:
    """The kernels for this CPU, compiled on first use; ``None`` where they cannot be."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: the engine runs PyTorch's CPU kernels")
        return None
    try:
        return CpuKernels(_build(compiler))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the fused CPU kernels did not build (%s); using PyTorch's", exc)
        return None


def _build(compiler: str) -> Path:
    from ..models import cache_dir

    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, check=True, timeout=30
    ).stdout
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Full-width AVX-512 where the CPU has it (GCC defaults to 256-bit vectors there).
        flags.append("-mprefer-vector-width=512")
    signature = " ".join(flags) + _cpu_signature()
    key = hashlib.sha256(source + version + signature.encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    target = folder / f"cpu_kernels-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: processes building at once each finish
    # their own file, and no process ever loads a half-written one.
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", scratch, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _cpu_signature() -> str:
    """What the compiled code depends on: the machine and its instruction-set flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"
