"""A base model without the model: what a front end needs to turn requests into inputs for an
engine that runs the model elsewhere (a vLLM server fed ``prompt_embeds``).

``load_front_end`` reads the tokenizer, the config, the chat template and the input embedding
table only. The table is read from the checkpoint's safetensors by the parameter's own name,
found by building the model on the meta device (no memory) and asking it for its input
embeddings, so it works whatever the architecture calls it; a sharded checkpoint's index says
which file holds it, and only that file is opened (or, from the Hub, downloaded).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class FrontEnd:
    """A base model's tokenizer, config and input embedding table, and the name adapters
    record for it (``BaseModel.name``)."""

    name: str
    config: Any
    tokenizer: Any
    embedding: torch.nn.Embedding

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.embedding_dim)

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.num_embeddings)

    @property
    def max_length(self) -> int:
        """The model's context in tokens (``max_position_embeddings``; unbounded if unset)."""
        text = self.config.get_text_config()
        return int(getattr(text, "max_position_embeddings", 0) or 1 << 30)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The table, under the name a transformers model gives it (``embeds.prompt_embeds``
        takes either)."""
        return self.embedding


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding table whose rows the model scales as it looks them up (Gemma: by
    sqrt(hidden), rounded to the table's dtype, as its own module does). vLLM takes
    ``prompt_embeds`` as that module's output, so the text's rows must be scaled here too."""

    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        rows, width = weight.shape
        super().__init__(rows, width, _weight=weight, _freeze=True)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        factor = torch.tensor(self.scale, dtype=torch.float32).to(self.weight.dtype)
        return super().forward(ids) * factor


def embedding_name(config: Any) -> str:
    """The input embedding's parameter name in a checkpoint of ``config``'s model."""
    return _embedding(config)[0]


def _embedding(config: Any) -> tuple[str, float | None]:
    """The input embedding's parameter name, and the scale its module applies (or None)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    table = model.get_input_embeddings()
    scale = getattr(table, "scalar_embed_scale", None)
    for name, module in model.named_modules():
        if module is table:
            return f"{name}.weight", None if scale in (None, 1.0) else float(scale)
    raise UserError(f"cannot find the input embedding of {type(model).__name__}")


def load_front_end(name: str | None = None, dtype: torch.dtype | None = None) -> FrontEnd:
    """The front end of a base model by Hub id or local folder (``None``: the embedded model).

    Raises:
        UserError: the folder or id cannot be read, or its weights hold no input embedding.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .hub import unreachable_note
    from .models import EMBEDDED_HUB_ID, embedded_model_dir

    if name is None:
        source, record = str(embedded_model_dir()), EMBEDDED_HUB_ID
    else:
        source, record = name, name
        if os.path.exists(name) and not (Path(name) / "config.json").is_file():
            raise UserError(f"{name} is not a model folder (no config.json)")
        if not os.path.exists(name) and name.startswith((".", "/", "~")):
            raise UserError(f"model folder {name} does not exist")
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        note = unreachable_note()
        raise UserError(f"cannot load model {name or record!r}: {first}{note}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    key, scale = _embedding(config)
    weight = _read_tensor(source, key).to(dtype or torch.float32)
    table: torch.nn.Embedding = (
        torch.nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=None)
        if scale is None
        else ScaledEmbedding(weight, scale)
    )
    return FrontEnd(name=record, config=config, tokenizer=tokenizer, embedding=table)


def _read_tensor(source: str, key: str) -> torch.Tensor:
    """Tensor ``key`` of the checkpoint at ``source``: the single weights file, or the file a
    sharded checkpoint's index names for it. A checkpoint saved from the bare decoder (its keys
    without the ``model.`` of the causal-LM class) is read too."""
    from safetensors import safe_open

    index = _file(source, INDEX)
    candidates = [key]
    if "." in key:
        candidates.append(key.split(".", 1)[1])
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        found = next((k for k in candidates if k in weight_map), None)
        if found is None:
            raise UserError(f"{source}: its index names no tensor {key!r} (the input embedding)")
        path = _file(source, weight_map[found])
    else:
        path = _file(source, WEIGHTS)
        found = None
    if path is None:
        raise UserError(f"{source} has no {WEIGHTS} (the front end reads safetensors only)")
    with safe_open(str(path), framework="pt") as weights:
        names = set(weights.keys())
        found = found or next((k for k in candidates if k in names), None)
        if found is None:
            raise UserError(f"{path} holds no tensor {key!r} (the input embedding)")
        tensor: torch.Tensor = weights.get_tensor(found)
    return tensor


def _file(source: str, filename: str) -> Path | None:
    """``filename`` of a local model folder or a Hub repository (downloaded alone); None when
    it has none."""
    if os.path.isdir(source):
        path = Path(source) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename))
    except EntryNotFoundError:
        return None
    except OSError as exc:
        from .hub import unreachable_note

        raise UserError(f"cannot read {filename} of {source!r}: {exc}{unreachable_note()}") from exc
