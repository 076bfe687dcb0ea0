"""What an adapter folder carries for people: the loss plot and a short model card."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train import TrainConfig, TrainResult


def plot_losses(result: TrainResult, path: Path) -> None:
    """Train loss per step and held-out loss per epoch (epoch 0: before training) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        [e["epoch"] * steps_per_epoch for e in result.evals],
        [e["loss"] for e in result.evals],
        color="#c33",
        marker="o",
        label="held-out loss (per epoch)",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{result.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(
    path: Path,
    name: str,
    base: str,
    config: TrainConfig,
    result: TrainResult,
    extra: dict[str, Any],
) -> None:
    """A README.md with what the adapter is, how it was trained and what it measured."""
    before, after = result.loss_before, result.loss_after
    data = extra.get("data", "?")
    lines = [
        f"# {name}",
        "",
        f"A soft prompt (prompt tuning, Lester et al. 2021) for `{base}`, trained with softprompt.",
        "It is a PEFT PROMPT_TUNING adapter: `peft.PeftModel.from_pretrained` loads it too.",
        *(
            ["The base weights were softprompt's embedded build (the Q4_1 GGUF, dequantised)."]
            if base == "HuggingFaceTB/SmolLM2-135M-Instruct"
            else []
        ),
        "",
        "| | |",
        "|---|---|",
        f"| virtual tokens | {config.virtual_tokens} (init: {config.init}) |",
        f"| trainable parameters | {result.trainable_params:,d} of {result.total_params:,d} |",
        f"| training data | `{data}` ({result.samples // config.epochs} texts, "
        f"{config.epochs} epochs) |",
        f"| held-out data | `{extra.get('eval_data', '?')}` |",
        f"| held-out loss | {before:.3f} before, {after:.3f} after (nats/token) |",
        f"| training time | {result.seconds:.0f} s |",
        "",
        "![loss](loss.png)",
        "",
        "Use it:",
        "",
        "```",
        f'softprompt generate --adapter {name} --prompt "..."',
        "```",
        "",
    ]
    path.write_text("\n".join(lines))
