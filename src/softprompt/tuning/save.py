"""Saving a trained prompt: ``save_trained`` writes the PEFT files and everything beside them
(settings, loss log and plot, model card, held-out split) into a staging folder and puts it in
place, so a failed save leaves nothing half-written; whatever goes wrong, the trained rows are
rescued to a folder the error names (``rescue``), never thrown away.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..adapters import Adapter, adapter_config, write_adapter_files
from ..data import Example, as_example
from ..errors import UserError
from ..files import check_output, put_in_place, staging_dir
from ..prompt import SoftPromptModel
from .card import write_model_card
from .config import HELDOUT_FILE, RunConfig, TrainConfig, TrainResult


def method_config(spm: SoftPromptModel, config: TrainConfig, n: int) -> dict[str, Any]:
    """The PEFT config an adapter of ``config.method`` carries (empty for prompt tuning, whose
    file config is written at save time)."""
    if config.method == "prompt":
        return {}
    from ..prefix import peft_config

    return peft_config(n, spm.prefix_shape, spm.base.name)


def save_trained(
    spm: SoftPromptModel,
    name: str,
    output: str | Path,
    config: TrainConfig,
    result: TrainResult,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    heldout: Sequence[str | Example] | None = None,
) -> Path:
    """Write adapter ``name`` to ``output``: PEFT files, config, loss log, plot and model card.

    Everything is written into a staging sibling folder first, then put in place atomically
    (``files.put_in_place``). Whatever goes wrong, the trained rows are not lost: they are
    rescued to a folder (``rescue``) that the error names.

    Raises:
        UserError: ``output`` exists and is not empty (unless ``overwrite``), or cannot be written
            (an ``OSError`` such as a full disk or a refused permission); the message says where
            the trained prompt was rescued to.
    """
    config = ran_with(config, result)
    weights, peft_config, loss_log = _adapter_parts(spm, name, config, result)
    tmp: Path | None = None
    target = Path(output)
    try:
        target = check_output(output, overwrite)
        tmp = staging_dir(target)
        write_adapter_files(tmp, weights, peft_config)
        (tmp / "training_config.json").write_text(
            json.dumps({**asdict(config), **(extra or {}), "base_model": spm.base.name}, indent=2)
            + "\n"
        )
        (tmp / "loss_log.json").write_text(json.dumps(loss_log, indent=2) + "\n")
        from ..insight.plots import plot_losses

        plot_losses(result, tmp / "loss.png")
        write_model_card(tmp / "README.md", name, spm.base.name, config, result, extra or {})
        if heldout is not None:
            (tmp / HELDOUT_FILE).write_text(
                "".join(json.dumps(as_example(t).as_json()) + "\n" for t in heldout)
            )
        tmp.chmod(0o755)
        put_in_place(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        rescued = rescue(name, weights, peft_config, loss_log)
        if isinstance(exc, OSError | UserError):
            where = (
                f"the trained prompt was saved to {rescued} instead; move it into place with "
                f"`mv {rescued} {target}`"
                if rescued
                else "and it could not be saved anywhere else either"
            )
            why = (
                exc
                if isinstance(exc, UserError)
                else f"cannot save {target}: {exc.strerror or exc}"
            )
            raise UserError(f"{why}; {where}") from exc
        if rescued:
            print(f"softprompt: the trained prompt was saved to {rescued}", file=sys.stderr)
        raise
    return target


def _adapter_parts(
    spm: SoftPromptModel, name: str, config: RunConfig, result: TrainResult
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """A trained adapter's rows, its PEFT config and its loss log."""
    weights = spm.adapter_weights(name)
    adapter = Adapter(name=name, weights=weights)
    peft_config = (
        adapter_config(adapter, spm.base.name, init=config.init, init_text=config.init_text)
        if config.method == "prompt"
        else method_config(spm, config, adapter.num_virtual_tokens)
    )
    loss_log = {
        "steps": result.steps,
        "evals": result.evals,
        "seconds": result.seconds,
        "samples": result.samples,
        "texts_cut": result.texts_cut,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "base_checksum_before": result.base_checksum_before,
        "base_checksum_after": result.base_checksum_after,
        "best_step": result.best_step,
        "kept_by": result.kept_by,
        "stopped_early": result.stopped_early,
        "epochs_trained": result.epochs_trained,
        "resumed_from": result.resumed_from,
    }
    return weights, peft_config, loss_log


def rescue_trained(
    spm: SoftPromptModel, name: str, config: TrainConfig, result: TrainResult
) -> Path | None:
    """Keep a trained adapter that a check after training refuses to save (see ``rescue``)."""
    return rescue(name, *_adapter_parts(spm, name, ran_with(config, result), result))


def ran_with(config: TrainConfig, result: TrainResult) -> RunConfig:
    """The settings a result was trained with: its own (every default decided), else
    ``config``'s resolved for plain texts (a result not made by ``train``)."""
    if result.config is not None:
        return result.config
    return config if isinstance(config, RunConfig) else config.resolve(["text"])


def rescue(
    name: str, weights: torch.Tensor, peft_config: dict[str, Any], loss_log: dict[str, Any]
) -> Path | None:
    """Save a trained prompt that could not go where asked; returns where it went, or None.

    Tries a ``rescued/`` folder in softprompt's cache, then the system's temporary folder.
    """
    from ..models import cache_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for root in (cache_dir() / "rescued", Path(tempfile.gettempdir()) / "softprompt-rescued"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"{name}-{stamp}-", dir=root))
            write_adapter_files(folder, weights, peft_config)
            (folder / "loss_log.json").write_text(json.dumps(loss_log, indent=2) + "\n")
            folder.chmod(0o755)
            return folder
        except OSError:
            continue
    return None
