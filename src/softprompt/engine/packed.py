"""Faster CPU linear layers for serving: oneDNN kernels on weights packed once, up front.

PyTorch's default CPU matmul re-reads the weight in its plain layout on every call; for the
small batches of a decode step that wastes most of the time (measured on this project's 2-core
machine: a 576x1536 float32 projection at batch 32 took 1.16 ms plain and 0.44 ms packed). The
engine runs a shadow of the caller's model whose ``nn.Linear`` layers hold packed copies of their
weights; every other module, parameter and buffer is shared, and the caller's model is untouched.
The price is one extra copy of the linear weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class PackedLinear(nn.Module):
    """``nn.Linear`` running oneDNN's inner product on a weight reordered for it once."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: nn.Module) -> bool:
    """Whether packing applies: float32 weights on the CPU, and this PyTorch has the kernels."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    linear = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    try:
        got = PackedLinear(linear)(x)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, linear(x).detach(), atol=1e-5))


def packed_model(model: nn.Module) -> nn.Module:
    """A shadow of ``model`` sharing every parameter and buffer, with packed linear layers."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    shadow = copy.deepcopy(model, memo=shared)
    for parent in list(shadow.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
    return shadow
