"""Faster CPU linear layers for serving: oneDNN kernels on weights packed once, up front.

PyTorch's default CPU matmul re-reads the weight in its plain layout on every call; for the
small batches of a decode step that wastes most of the time (figures in
docs/benchmarks/engine.md). The
engine runs a shadow of the caller's model whose ``nn.Linear`` layers hold packed copies of their
weights; every other module, parameter and buffer is shared, and the caller's model is untouched.
The price is one extra copy of the linear weights. Where the CPU decode path measured fastest
is the C kernel's panel linear (``cpu_kernels.py``, ``autotune.py``), that layout is the copy
kept instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class PackedLinear(nn.Module):
    """``nn.Linear`` running oneDNN's inner product on a weight reordered for it once.

    With ``full_batch`` set, inputs of exactly that many rows (a full decode batch, what a
    loaded server runs) take MKL's sgemm on a second copy of the weight packed for that row count
    (faster on some CPUs, slower on others: ``autotune`` decides). MKL packs for one row count
    only, so every other
    batch stays on oneDNN. The MKL copy is made at the first full batch, so an engine that never
    fills its batch (the CLI's short lists) never holds it. ``rebuild`` gives the plain weight
    again for that (default: ``weight`` itself, which is then kept; pass it for a weight made
    for this layer alone, so that only the packed copies stay in memory).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        full_batch: int | None = None,
        rebuild: Callable[[], torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        """What the oneDNN copy holds and multiplies in: float32, or bfloat16 (inputs rounded
        to it, products accumulated in float32 by oneDNN, outputs given back in float32; on
        CPUs with native bfloat16 dot products, about twice float32's speed: ``bfloat16``)."""
        self.packed: torch.Tensor | None = None
        """oneDNN's copy, made at its first use (or by ``keep_only`` when it is the one kept), so
        a layer that runs on the panels never holds it."""
        self.bias = None if bias is None else bias.detach().float()
        self._narrow_bias: torch.Tensor | None = None
        self.full_batch = full_batch if full_batch and _has_mkl_pack() else None
        self._weight = rebuild if rebuild is not None else weight.detach
        self.batch_packed: torch.Tensor | None = None
        self.panels: torch.Tensor | None = None
        """The weight laid out for the C kernel's panel linear (``cpu_kernels.py``), when in
        use; every call then takes it, whatever its row count."""
        self._panel_kernels: Any = None

    @classmethod
    def of(cls, linear: nn.Linear, full_batch: int | None = None) -> PackedLinear:
        """The packed form of ``linear`` (its weight and bias are shared, not copied)."""
        return cls(linear.weight, linear.bias, full_batch)

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Multiply in ``dtype`` (float32 or bfloat16) on oneDNN; the copy packed for the other
        is dropped. The MKL and panel paths are float32's only."""
        if dtype != self.dtype:
            self.dtype = dtype
            self.packed = None
            self._narrow_bias = None

    def use_panels(self, kernels: Any) -> None:
        """Run on the C kernel's panel linear (``kernels``: a ``CpuKernels``), laying the
        weight out for it on first use; ``None``: back to oneDNN/MKL (the panels are kept until
        ``keep_only`` drops them)."""
        if kernels is not None and self.panels is None:
            from .cpu_kernels import weight_panels

            self.panels = weight_panels(self._weight().float())
        self._panel_kernels = kernels

    def keep_only(self, panels: bool, mkl: bool = False) -> None:
        """Free the copies the chosen path does not read: with ``panels``, oneDNN's and MKL's;
        without, the panels, and MKL's unless ``mkl``; oneDNN's copy is made now if it is kept,
        so the first request does not wait for it."""
        if not panels:
            self._onednn()
        if panels:
            if self.panels is None or self._panel_kernels is None:
                raise RuntimeError("keep_only(panels=True) before use_panels")
            self.packed = None
            self.full_batch = None
        else:
            self.panels = None
            self._panel_kernels = None
        if panels or not mkl:
            self.batch_packed = None

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """The product in the layer's own dtype, input and output alike (bfloat16 in, bfloat16
        out, the bias added inside oneDNN's float32 accumulation): what the fused decode step
        passes between its kernels, with no conversion on either side."""
        if self.bias is not None and self._narrow_bias is None:
            self._narrow_bias = self.bias.to(self.dtype)
        return torch.ops.mkldnn._linear_pointwise(
            x.to(self.dtype), self._onednn(), self._narrow_bias, "none", [], ""
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype != torch.float32:
            return self.narrow(x).float()
        if self._panel_kernels is not None:
            out = self._panel_kernels.panel_linear(x, self.panels, self.out_features)
            return out if self.bias is None else out.add_(self.bias)
        if self.full_batch and x.numel() == self.full_batch * self.in_features:
            if self.batch_packed is None:
                self._pack_full_batch()
            return torch.ops.mkl._mkl_linear(
                x, self.batch_packed, self.shape_only, self.bias, self.full_batch
            )
        return torch.ops.mkldnn._linear_pointwise(x, self._onednn(), self.bias, "none", [], "")

    def _onednn(self) -> torch.Tensor:
        """oneDNN's copy of the weight in ``dtype``, packed at its first use."""
        if self.packed is None:
            self.packed = _onednn_pack(self._weight(), self.dtype)
        return self.packed

    def _pack_full_batch(self) -> None:
        weight = self._weight().float()
        self.batch_packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, self.full_batch)
        # MKL reads only the shape of the plain weight on this path: a zero-stride stand-in.
        self.shape_only = weight.new_zeros(()).expand(self.out_features, self.in_features)

    def nbytes(self) -> int:
        """Bytes of the packed copies. MKL's buffer is reserved about three times larger than
        the weight but only the weight's size of it is written, so only that much is resident
        (measured: +660 MiB RSS for the embedded model's 513 MiB of linear weights)."""
        total = 0
        if self.packed is not None:
            total += self.packed.numel() * self.packed.element_size()
        if self.batch_packed is not None:
            total += self.out_features * self.in_features * 4
        if self.panels is not None:
            total += self.panels.numel() * self.panels.element_size()
        return total


def _onednn_pack(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` in ``dtype``, reordered for oneDNN's inner product."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)


def _has_mkl_pack() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def can_pack(model: nn.Module, dtype: torch.dtype = torch.float32) -> bool:
    """Whether packing applies: float32 or bfloat16 weights on the CPU, and this PyTorch's
    oneDNN multiplies in ``dtype`` (float32, or bfloat16 for ``PackedLinear.dtype``)."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    linear = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    try:
        got = PackedLinear(linear.weight, linear.bias, dtype=dtype)(x)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    # bfloat16 keeps 8 bits of mantissa: its products land within a few hundredths here.
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got, linear(x).detach(), atol=tolerance))


def packed_model(model: nn.Module, full_batch: int | None = None) -> nn.Module:
    """A shadow of ``model`` sharing every parameter and buffer, with packed linear layers."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    shadow = copy.deepcopy(model, memo=shared)
    for parent in list(shadow.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear.of(child, full_batch))
    return shadow
