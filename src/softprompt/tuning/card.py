"""The model card a trained adapter folder carries as its README.md: what it is, how it was
trained, what it measured, and the YAML metadata the Hub and PEFT read, so the folder can be
uploaded as it is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RunConfig, TrainConfig, TrainResult


def write_model_card(
    path: Path,
    name: str,
    base: str,
    config: RunConfig,
    result: TrainResult,
    extra: dict[str, Any],
) -> None:
    """A README.md with what the adapter is, how it was trained and what it measured, and the
    metadata the Hub and PEFT read (``library_name: peft``, ``base_model``, tags, the held-out
    loss as a ``model-index`` result), so the folder can be uploaded as it is."""
    before, after = result.loss_before, result.loss_after
    epochs = max(1, result.epochs_trained or config.epochs)
    data = extra.get("data", "?")
    prefix = config.method == "prefix"
    what = (
        "A deep prompt (prefix tuning, Li and Liang 2021: keys and values at every layer)"
        if prefix
        else "A soft prompt (prompt tuning, Lester et al. 2021)"
    )
    kind = "PREFIX_TUNING" if prefix else "PROMPT_TUNING"
    lines = [
        "---",
        _card_metadata(name, base, config, after, extra).to_yaml(),
        "---",
        f"# {name}",
        "",
        f"{what} for `{base}`, trained with softprompt.",
        f"It is a PEFT {kind} adapter: `peft.PeftModel.from_pretrained` loads it too.",
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
        f"| training data | `{data}` ({result.samples // epochs} texts, {epochs} epochs) |",
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


def _card_metadata(
    name: str, base: str, config: TrainConfig, loss: float, extra: dict[str, Any]
) -> Any:
    """The card's YAML metadata, through huggingface_hub's own model (so the Hub reads it)."""
    from huggingface_hub import EvalResult, ModelCardData

    data, held = extra.get("data"), extra.get("eval_data")
    # Only Hub dataset ids are datasets the Hub can link; local files and bundled sets are not.
    hub = [d for d in (data,) if isinstance(d, str) and _hub_id(d)]
    results = []
    if isinstance(held, str) and loss == loss:  # a real held-out loss (not NaN)
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=held,
                dataset_name=held,
                metric_type="loss",
                metric_value=round(float(loss), 4),
                metric_name="held-out loss (nats/token)",
            )
        )
    return ModelCardData(
        library_name="peft",
        base_model=base,
        pipeline_tag="text-generation",
        tags=["prefix-tuning" if config.method == "prefix" else "prompt-tuning", "softprompt"],
        datasets=hub or None,
        model_name=name,
        eval_results=results or None,
    )


def _hub_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub dataset id (``owner/name``), not a local path."""
    if source.startswith("examples:") or Path(source).exists():
        return False
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
