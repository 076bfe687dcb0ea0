"""Prompt rows reparameterised while they train, folded to plain rows when they are saved.

``Residual`` (``--reparam residual``, after Razdaibiedina et al. 2023, residual prompt tuning):
the rows the model sees are ``P + up(relu(down(P)))``, one small MLP shared by every row, with
``P`` and the MLP trained together. The paper puts a LayerNorm on the MLP's output; here the
up-projection starts at zero instead, so training starts from the initial rows exactly (a
``vocab`` or ``labels`` start keeps its meaning) and the MLP grows from there. At the end the
rows are computed once and saved as an ordinary PEFT prompt: nothing downstream knows.
"""

from __future__ import annotations

import torch
from torch import nn

REPARAMS = ("none", "residual")


class Residual(nn.Module):
    """Rows ``(n, D)`` as ``rows + up(relu(down(rows)))``; ``bottleneck`` hidden units."""

    def __init__(self, rows: torch.Tensor, bottleneck: int | None = None) -> None:
        super().__init__()
        width = int(rows.shape[1])
        hidden = bottleneck or max(8, width // 4)
        self.rows = nn.Parameter(rows.detach().clone().float())
        self.down = nn.Linear(width, hidden, device=rows.device)
        self.up = nn.Linear(hidden, width, device=rows.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self) -> torch.Tensor:
        return self.rows + self.up(torch.relu(self.down(self.rows)))
