"""Adapters and their files: a soft prompt's rows and config, and PEFT's prompt-tuning format
on disk (``adapter_config.json`` and ``adapter_model.safetensors`` holding ``prompt_embeddings``),
which PEFT and the tools around it read, and which softprompt reads from them (prompt tuning,
P-tuning and prefix tuning folders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
TENSOR_NAME = "prompt_embeddings"
SHALLOW_TYPES = ("PROMPT_TUNING", "P_TUNING", "CPT")
"""PEFT types whose tensor is rows of input embeddings: P-tuning saves its encoder's output,
CPT the in-context examples' embeddings plus its trained deltas (what both prepend at
inference; CPT's own loss and type masks matter only to its training)."""
DEEP_TYPES = ("PREFIX_TUNING", "CARTRIDGE")
"""PEFT types whose tensor is keys and values for every layer, in PREFIX_TUNING's layout
(CARTRIDGE stores that cache directly; its frozen first rows are rows like any other here)."""
LOADED_TYPES = SHALLOW_TYPES + DEEP_TYPES
REFUSED_TYPES = {
    "MULTITASK_PROMPT_TUNING": "its prompt is a shared prompt times a task's low-rank factors, "
    "chosen by a task id given with every input; softprompt serves one fixed prompt per adapter "
    "(no task ids), so it cannot run it as trained",
    "ADAPTION_PROMPT": "LLaMA-Adapter's prompts are gated attention modules inside the model, "
    "not rows or keys/values softprompt could load",
}
"""Prompt-learning PEFT types that cannot load here, each with why."""
PEFT_INIT_NAMES = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM", "file": "RANDOM"}


@dataclass
class Adapter:
    """One soft prompt: its name, its rows ``(num_virtual_tokens, token_dim)`` and its config."""

    name: str
    weights: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.weights.shape[0])

    @property
    def token_dim(self) -> int:
        return int(self.weights.shape[1])

    @property
    def method(self) -> str:
        """``prompt`` (rows of input embeddings: PEFT's PROMPT_TUNING, P_TUNING) or ``prefix``
        (keys and values at every layer: PEFT's PREFIX_TUNING, CARTRIDGE; see ``prefix``)."""
        return "prefix" if self.config.get("peft_type") in DEEP_TYPES else "prompt"


def hidden_size_mismatch(adapter: Adapter, hidden_size: int) -> str | None:
    """Why ``adapter`` cannot run on a model of ``hidden_size``, or None when it can."""
    if adapter.token_dim == hidden_size:
        return None
    made_for = adapter.config.get("base_model_name_or_path") or "another model"
    return (
        f"adapter {adapter.name!r} has token_dim {adapter.token_dim} but the base model "
        f"has hidden size {hidden_size} (it was made for {made_for})"
    )


def adapter_config(
    adapter: Adapter, base_name: str, init: str = "vocab", init_text: str | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT writes for a causal-LM prompt-tuning adapter."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": None,
        "num_layers": None,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": adapter.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": PEFT_INIT_NAMES.get(init, "RANDOM"),
        "prompt_tuning_init_text": init_text if init == "text" else None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": adapter.token_dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": base_name if init == "text" else None,
    }


def write_adapter_files(folder: Path, weights: torch.Tensor, config: dict[str, Any]) -> None:
    """Write the two PEFT files into an existing ``folder``."""
    from safetensors.torch import save_file

    save_file(
        {TENSOR_NAME: weights.detach().float().contiguous().cpu()}, str(folder / WEIGHTS_FILE)
    )
    (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; adapters are made to share
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(
    path: str | Path, allow_pickle: bool = False, name: str | None = None, hub: bool = True
) -> Adapter:
    """Read a PEFT prompt-tuning, P-tuning or prefix-tuning adapter folder.

    Args:
        path: the folder holding ``adapter_config.json`` and the weights, or a Hub repository
            ``owner/name[@revision]`` (downloaded into the Hugging Face cache; a cached copy
            loads offline).
        allow_pickle: accept ``adapter_model.bin`` (a pickle) when there is no safetensors file.
        name: the name to load it under; defaults to the folder's (or repository's) name.
        hub: whether ``path`` may name a Hub repository. False for paths that came from a local
            folder (a server's adapters folder): a folder deleted meanwhile is then an error,
            never a download of whatever a Hub repository of that name holds.

    Raises:
        UserError: not an adapter folder, not a prompt-learning adapter, corrupt or refused weights.
    """
    from .hub import download_adapter, hub_adapter

    if hub and (repo := hub_adapter(str(path))) is not None:
        repo_id, revision = repo
        name = name or repo_id.split("/")[1]
        path = download_adapter(repo_id, revision)
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"adapter {str(path)!r} does not exist or is not a folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{folder} is not an adapter folder (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_bytes())
    except OSError as exc:
        raise UserError(f"cannot read {config_path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    peft_type = config.get("peft_type")
    if isinstance(peft_type, str) and peft_type in REFUSED_TYPES:
        raise UserError(f"{folder} is a {peft_type} adapter: {REFUSED_TYPES[peft_type]}")
    if not isinstance(peft_type, str) or peft_type not in LOADED_TYPES:
        raise UserError(
            f"{folder} is a {peft_type} adapter; softprompt loads the prompt-learning adapters "
            f"{', '.join(LOADED_TYPES)}"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{folder} is for task {config.get('task_type')}, not CAUSAL_LM")
    expected = _config_int(config_path, config, "num_virtual_tokens")
    submodules = _config_int(config_path, config, "num_transformer_submodules")
    if submodules not in (None, 1):
        raise UserError(
            f"{folder} has num_transformer_submodules {submodules} (an encoder-decoder adapter); "
            "softprompt loads adapters of causal (decoder-only) models, which have 1"
        )
    token_dim = _config_int(config_path, config, "token_dim")
    weights = _read_weights(folder, allow_pickle)
    if weights.ndim != 2 or 0 in weights.shape:
        raise UserError(
            f"{folder}: {TENSOR_NAME} has shape {tuple(weights.shape)}, expected "
            "(num_virtual_tokens, token_dim) with neither zero"
        )
    if not weights.dtype.is_floating_point:
        raise UserError(f"{folder}: {TENSOR_NAME} holds {weights.dtype}, not floating point")
    if not bool(torch.isfinite(weights).all()):
        raise UserError(f"{folder}: {TENSOR_NAME} holds NaN or infinite values")
    if expected is not None and expected != weights.shape[0]:
        raise UserError(
            f"{folder}: config says {expected} virtual tokens but the weights have "
            f"{weights.shape[0]} rows"
        )
    if peft_type in DEEP_TYPES:
        layers = _config_int(config_path, config, "num_layers")
        if (
            layers is not None
            and token_dim is not None
            and weights.shape[1] != 2 * layers * token_dim
        ):
            raise UserError(
                f"{folder}: a prefix of {layers} layers x 2 x token_dim {token_dim} needs "
                f"{2 * layers * token_dim} columns; the weights have {weights.shape[1]}"
            )
    elif token_dim is not None and token_dim != weights.shape[1]:
        raise UserError(f"{folder}: config token_dim {token_dim} != weights' {weights.shape[1]}")
    return Adapter(name=name or folder.resolve().name, weights=weights.float(), config=config)


def _config_int(path: Path, config: dict[str, Any], key: str) -> int | None:
    """``config[key]`` as a positive int, None when absent; anything else is a UserError."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} must be a positive integer, not {value!r}")
    return value


def _read_weights(folder: Path, allow_pickle: bool) -> torch.Tensor:
    safetensors_path = folder / WEIGHTS_FILE
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(safetensors_path))
        except OSError as exc:
            raise UserError(f"cannot read {safetensors_path}: {exc.strerror or exc}") from exc
        except (SafetensorError, ValueError, TypeError) as exc:
            raise UserError(f"{safetensors_path} is corrupt: {exc}") from exc
    elif (folder / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise UserError(
                f"{folder} holds only a pickle ({PICKLE_FILE}), which can run code when loaded; "
                "pass --allow-pickle if you trust it"
            )
        try:
            tensors = torch.load(folder / PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means a bad file
            raise UserError(f"{folder / PICKLE_FILE} cannot be read: {exc}") from exc
    else:
        raise UserError(f"{folder} has no {WEIGHTS_FILE}")
    if not isinstance(tensors, dict) or not isinstance(tensors.get(TENSOR_NAME), torch.Tensor):
        keys = (
            ", ".join(sorted(map(str, tensors))) if isinstance(tensors, dict) else "no tensor dict"
        )
        raise UserError(f"{folder}: no {TENSOR_NAME!r} tensor in the weights (found: {keys})")
    tensor: torch.Tensor = tensors[TENSOR_NAME]
    return tensor
