"""Soft prompts as extra token ids (prompt tuning, Lester et al. 2021, arXiv:2104.08691).

A loaded base model gets one extra table, the prompt table, holding the rows of the virtual tokens
of every loaded adapter. Adapter k with n virtual tokens owns ids ``vocab + off_k ...
vocab + off_k + n - 1``. Ids below ``vocab`` are embedded by the model's own table and the rest by
the prompt table, and the result reaches the model as ``inputs_embeds``. Nothing in the model
changes, so logits stay over the real vocabulary, a tied ``lm_head`` keeps the base weight, and
rows of one batch can each carry a different adapter. Files on disk are PEFT's prompt-tuning format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError

if TYPE_CHECKING:
    from .models import BaseModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
TENSOR_NAME = "prompt_embeddings"
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
        """``prompt`` (rows of input embeddings) or ``prefix`` (keys and values at every layer,
        PEFT's PREFIX_TUNING; see ``prefix``)."""
        return "prefix" if self.config.get("peft_type") == "PREFIX_TUNING" else "prompt"


class SoftPromptModel:
    """A frozen base model with any number of soft prompts loaded side by side.

    The caller's model is left exactly as it was (module tree, state_dict keys, weights): token
    ids are embedded here, real ids through the model's own embedding and virtual ids through the
    prompt table, and reach the model as ``inputs_embeds``. ``encode(text, adapter)`` gives the
    token ids of one row; rows with different adapters (or none) batch together because each
    carries its own virtual ids.
    """

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        embedding = self.model.get_input_embeddings()
        if not isinstance(embedding, nn.Embedding):
            raise UserError(
                f"the model's input embedding is a {type(embedding).__name__}, "
                "not an nn.Embedding; softprompt cannot add a prompt table"
            )
        self.embedding: nn.Embedding = embedding
        self.adapters: dict[str, Adapter] = {}
        """Loaded adapters; each one's ``weights`` is the live parameter (trained in place)."""
        self._table: torch.Tensor | None = None
        self._table_key: tuple[tuple[int, int], ...] = ()
        self._head_only: bool | None = None
        self._compiled: Any = None
        self._prefix_shape: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.num_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.embedding_dim)

    @property
    def num_virtual_tokens(self) -> int:
        """Rows in the prompt table: the virtual tokens of every loaded adapter."""
        return sum(a.num_virtual_tokens for a in self.adapters.values())

    def add_adapter(self, adapter: Adapter, trainable: bool = False) -> nn.Parameter:
        """Load ``adapter`` into the prompt table and return its rows as a parameter.

        The parameter is what ``self.adapters[name].weights`` holds from now on, so training it
        changes what every reader (generation, eval, inspect, report) sees.

        Raises:
            UserError: the name is taken or the adapter was made for another hidden size (a
                prefix adapter: for another layer count, head count or head size).
        """
        if adapter.name in self.adapters:
            raise UserError(f"an adapter named {adapter.name!r} is already loaded")
        if adapter.method == "prefix":
            mismatch = self.prefix_shape.mismatch(adapter.config, adapter.token_dim)
            if mismatch:
                raise UserError(f"{adapter.name}: {mismatch}")
        else:
            mismatch = hidden_size_mismatch(adapter, self.hidden_size)
        if mismatch:
            raise UserError(mismatch)
        device = self.embedding.weight.device
        rows = adapter.weights.detach().to(device=device, dtype=torch.float32, copy=True)
        param = nn.Parameter(rows, requires_grad=trainable)
        self.adapters[adapter.name] = Adapter(adapter.name, param, dict(adapter.config))
        self._table = None
        return param

    def remove_adapter(self, name: str) -> Adapter:
        """Unload adapter ``name``; the virtual ids of adapters loaded after it move down."""
        adapter = self.adapters.pop(self._check(name))
        self._table = None
        return adapter

    def adapter_weights(self, name: str) -> torch.Tensor:
        """A copy of the current rows of adapter ``name`` (after training, the trained ones)."""
        return self.adapters[self._check(name)].weights.detach().clone()

    def virtual_ids(self, name: str | None) -> list[int]:
        """Token ids of the virtual tokens of adapter ``name`` (empty for the base model)."""
        if name is None:
            return []
        self._check(name)
        offset = self.vocab_size
        for other, adapter in self.adapters.items():
            if other == name:
                return list(range(offset, offset + adapter.num_virtual_tokens))
            offset += adapter.num_virtual_tokens
        raise AssertionError("unreachable")

    def text_ids(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of ``text`` as the tokenizer makes them, cut to ``max_length``."""
        ids = list(self.tokenizer(text)["input_ids"])
        return ids[:max_length] if max_length else ids

    def encode(self, text: str, adapter: str | None, max_length: int | None = None) -> list[int]:
        """One row: ``[virtual ids of adapter] + [text ids]``."""
        return self.virtual_ids(adapter) + self.text_ids(text, max_length)

    def prompt_table(self) -> torch.Tensor:
        """All loaded prompt rows ``(P, D)`` in the model's dtype, adapters in load order.

        Built once per change of the loaded set or of any adapter's values (tracked through the
        parameters' version counters); rebuilt on every call only while a row is being trained,
        so gradients reach the parameters.
        """
        params = [
            a.weights if a.method == "prompt" else self._placeholders(a)
            for a in self.adapters.values()
        ]
        dtype = self.embedding.weight.dtype
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.cat(params).to(dtype)
        key = tuple((id(p), p._version) for p in params)
        if self._table is None or key != self._table_key:
            if params:
                self._table = torch.cat([p.detach() for p in params]).to(dtype)
            else:
                self._table = self.embedding.weight.new_zeros(0, self.hidden_size)
            self._table_key = key
        return self._table

    def _placeholders(self, adapter: Adapter) -> torch.Tensor:
        """Zero rows standing for a prefix adapter's virtual ids in the prompt table: the ids
        mark a row's adapter; ``row_prefixes`` takes them out before the model sees the row."""
        return adapter.weights.new_zeros(adapter.num_virtual_tokens, self.hidden_size)

    @property
    def prefix_shape(self) -> Any:
        """The model's ``prefix.PrefixShape`` (raises ``UserError`` for a model it cannot fit)."""
        from .prefix import PrefixShape

        if self._prefix_shape is None:
            self._prefix_shape = PrefixShape.of(self.model)
        return self._prefix_shape

    def row_prefixes(self, rows: list[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
        """Rows with prefix adapters' virtual ids taken out, and each row's prefix (the live
        parameter) or None. Rows of prompt adapters and of the base model are unchanged."""
        if not any(a.method == "prefix" for a in self.adapters.values()):
            return rows, [None] * len(rows)
        owners: dict[int, Adapter] = {}
        offset = self.vocab_size
        for adapter in self.adapters.values():
            owners[offset] = adapter
            offset += adapter.num_virtual_tokens
        out: list[Any] = []
        prefixes: list[torch.Tensor | None] = []
        for row in rows:  # (ids, n_virtual, ...): what follows the two rides along unchanged
            ids, n_virtual = row[0], row[1]
            owner = owners.get(ids[0]) if n_virtual else None
            if owner is not None and owner.method == "prefix":
                out.append((ids[n_virtual:], 0, *row[2:]))
                prefixes.append(owner.weights)
            else:
                out.append(row)
                prefixes.append(None)
        return out, prefixes

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(B, T, D)`` for token ids ``(B, T)``, virtual ids included.

        Raises:
            UserError: an id is negative or beyond the vocabulary plus the loaded virtual tokens
                (checked for ids on the CPU, where it costs no device synchronisation).
        """
        vocab = self.vocab_size
        table = self.prompt_table()
        if ids.device.type == "cpu" and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab + table.shape[0]:
                bad = low if low < 0 else high
                raise UserError(
                    f"token id {bad} is out of range: the vocabulary has {vocab} tokens and "
                    f"{table.shape[0]} virtual tokens are loaded"
                )
        virtual = ids >= vocab  # (B, T)
        emb = self.embedding(ids.masked_fill(virtual, 0))  # (B, T, D)
        if table.shape[0] == 0:
            return emb
        # An embedding lookup, not ``table[index]``: the backward of advanced indexing adds
        # into the gradient with atomic adds from several threads on the CPU, in an order that
        # changes from run to run (two identical 2-thread trainings drifted apart from their
        # second step); the embedding's backward sums in a fixed order.
        rows = F.embedding((ids - vocab).clamp(min=0), table)  # (B, T, D)
        return torch.where(virtual.unsqueeze(-1), rows, emb)

    @property
    def device(self) -> torch.device:
        """Where the base model's weights are (and every batch must go)."""
        return self.embedding.weight.device

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Run the base model on token ids that may hold prompt adapters' virtual ids (through
        ``inputs_embeds``).

        Raises:
            UserError: the ids hold a prefix adapter's virtual ids: those are placeholders,
                and its keys/values reach the model only through ``scored_logits`` (training,
                evaluation) or the engine.
        """
        offset = self.vocab_size
        for name, adapter in self.adapters.items():
            end = offset + adapter.num_virtual_tokens
            if adapter.method == "prefix" and bool(
                ((input_ids >= offset) & (input_ids < end)).any()
            ):
                raise UserError(
                    f"forward runs prompt adapters only; prefix adapter {name!r} is a deep "
                    "prompt: score it with evaluate or scoring, generate with the engine"
                )
            offset = end
        return self.model(inputs_embeds=self.embed(input_ids), **kwargs)

    def scored_logits(
        self,
        batch: dict[str, torch.Tensor],
        where: torch.Tensor,
        prefixes: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Logits ``(N, V)`` at the N positions where ``where`` ``(B, L)`` is True.

        The output layer runs on those positions only: in training most of a batch's positions
        are scored, but none of the virtual tokens, padding or last positions need the
        vocabulary-wide product (the largest single one in a small model), nor its gradient.
        For models whose forward does more after the output layer (logit soft-capping or
        scaling), found by comparing both ways once, every logit is computed as before.
        """
        embeds = self.embed(batch["input_ids"])
        rest: dict[str, Any] = {k: v for k, v in batch.items() if k != "input_ids"}
        if prefixes is not None and any(p is not None for p in prefixes):
            from .prefix import batch_past

            cache, mask, lengths = batch_past(prefixes, self.prefix_shape, embeds.dtype)
            rest["attention_mask"] = torch.cat([mask, rest["attention_mask"]], dim=1)
            shift = torch.tensor(lengths, device=rest["position_ids"].device)[:, None]
            rest["position_ids"] = rest["position_ids"] + shift  # text after its prefix
            rest["past_key_values"] = cache
        if self._head_only_matches():
            body = self.model.base_model if self._compiled is None else self._compiled
            hidden = body(inputs_embeds=embeds, use_cache=False, **rest)
            return self.model.get_output_embeddings()(hidden.last_hidden_state[where])
        model = self.model if self._compiled is None else self._compiled
        logits = model(inputs_embeds=embeds, use_cache=False, **rest)
        return logits.logits[where]

    def compile(self, mode: str | None = None) -> None:
        """Run ``scored_logits`` (training and evaluation) through ``torch.compile``.

        The model's body (without the output layer, when ``scored_logits`` can leave it out) is
        compiled once for the shapes it meets; the caller's model itself is not changed. The
        first batches take a minute or so to compile; on a GPU, where an eager step of a small
        model waits on Python, the steps after run faster (``benchmarks/gpu_check.py``).
        """
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        target = self.model.base_model if self._head_only_matches() else self.model
        self._compiled = torch.compile(target, mode=mode, dynamic=None)

    def _head_only_matches(self) -> bool:
        """Whether the output layer on the base model's last hidden states gives its logits."""
        if self._head_only is not None:
            return self._head_only
        model, head = self.model, self.model.get_output_embeddings()
        config = model.config.get_text_config()
        reshaped = getattr(config, "final_logit_softcapping", None) or getattr(
            config, "logit_scale", 1
        ) not in (None, 1)
        ok = False
        if head is not None and not reshaped and getattr(model, "base_model", model) is not model:
            ids = torch.arange(1, 5, device=self.device)[None] % self.vocab_size
            with torch.no_grad():
                full = model(input_ids=ids, use_cache=False).logits.float()
                hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                mine = head(hidden).float()
            scale = float(full.abs().max()) or 1.0
            ok = full.shape == mine.shape and bool(
                torch.allclose(full, mine, rtol=1e-2, atol=1e-2 * scale)
            )
        self._head_only = ok
        return ok

    def base_checksum(self) -> str:
        """SHA-256 of the base model's weights (the prompt table is not part of the model)."""
        import hashlib

        digest = hashlib.sha256()
        for param in self.model.parameters():
            data = param.detach().cpu().contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _check(self, name: str) -> str:
        if name not in self.adapters:
            raise UserError(f"no adapter named {name!r} is loaded")
        return name


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
    if peft_type not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise UserError(
            f"{folder} is a {peft_type} adapter; softprompt loads PROMPT_TUNING, P_TUNING and "
            "PREFIX_TUNING"
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
    if peft_type == "PREFIX_TUNING":
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
