"""Figures, drawn with matplotlib's Agg backend (no display needed): loss curves, loss heatmap."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(result: Any, path: Path | io.BytesIO, title: str | None = None) -> None:
    """Train loss per step and held-out loss at each evaluation (step 0: before training) to a PNG.

    ``result`` is a TrainResult or anything with ``name``, ``steps`` and ``evals`` like it.
    """
    plt = _pyplot()
    steps_per_epoch = max(1, sum(1 for s in result.steps if s["epoch"] == 1))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(
        [s["step"] for s in result.steps],
        [s["loss"] for s in result.steps],
        color="#9ab",
        linewidth=1,
        label="train loss (per step)",
    )
    ax.plot(
        [e.get("step", e["epoch"] * steps_per_epoch) for e in result.evals],
        [e["loss"] for e in result.evals],
        color="#c33",
        marker="o",
        label="held-out loss",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or f"{result.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_heatmap(
    losses: Sequence[Sequence[float]],
    rows: Sequence[str],
    columns: Sequence[str],
    own: set[tuple[int, int]],
    path: Path | io.BytesIO,
    title: str = "held-out loss; framed: the adapter's own domain",
    colorbar: str = "loss (nats/token), lower is better",
    cmap: str = "viridis",
    number: str = "{:.2f}",
    axes: tuple[str, str] | None = None,
) -> None:
    """A matrix as a heatmap with its values written in; ``own`` cells get a black frame.

    By default the held-out loss matrix (darker is lower, so better); ``axes`` names the
    (x, y) axes (a confusion matrix: chosen, gold)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    width = max(4.8, 1.6 * len(columns) + 2.4)
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(rows) + 1.6), dpi=100)
    image = ax.imshow(losses, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=15, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    low, high = image.get_clim()
    for i, row in enumerate(losses):
        for j, value in enumerate(row):
            dark = (value < (low + high) / 2) == (cmap == "viridis")
            ax.text(
                j,
                i,
                number.format(value),
                ha="center",
                va="center",
                color="white" if dark else "black",
                fontsize=9,
            )
            if (i, j) in own:
                ax.add_patch(
                    Rectangle(
                        (j - 0.48, i - 0.46),
                        0.96,
                        0.92,
                        fill=False,
                        edgecolor="black",
                        linewidth=2.5,
                    )
                )
    fig.colorbar(image, ax=ax, label=colorbar)
    if axes:
        ax.set_xlabel(axes[0])
        ax.set_ylabel(axes[1])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def png_data_uri(source: Path | io.BytesIO) -> str:
    """A PNG as a ``data:`` URI, so an HTML page needs no files beside it."""
    data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
