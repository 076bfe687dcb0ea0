"""Soft prompts as extra token ids (prompt tuning, Lester et al. 2021, arXiv:2104.08691).

A loaded base model gets one extra table, the prompt table, holding the rows of the virtual tokens
of every loaded adapter. Adapter k with n virtual tokens owns ids ``vocab + off_k ...
vocab + off_k + n - 1``. Ids below ``vocab`` are embedded by the model's own table and the rest by
the prompt table, and the result reaches the model as ``inputs_embeds``. Nothing in the model
changes, so logits stay over the real vocabulary, a tied ``lm_head`` keeps the base weight, and
rows of one batch can each carry a different adapter. Files on disk are PEFT's prompt-tuning format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import Adapter, hidden_size_mismatch
from .errors import UserError

if TYPE_CHECKING:
    from .models import BaseModel


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

    def set_rows(self, name: str, rows: torch.Tensor) -> None:
        """Make ``rows`` adapter ``name``'s rows (same shape): a tensor computed from other
        parameters while it trains (``tuning.reparam``), kept as it is, graph included."""
        old = self.adapters[self._check(name)]
        if tuple(rows.shape) != tuple(old.weights.shape):
            raise ValueError(
                f"{name}: rows of shape {tuple(rows.shape)}, not {tuple(old.weights.shape)}"
            )
        self.adapters[name] = Adapter(name, rows, old.config)
        self._table = None

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
        """SHA-256 of the base model's weights (the prompt table is not part of the model).
        With the model sharded (``--shard``): of every process's digest of its own shards, in
        rank order, the same in every process (each must call it at the same point)."""
        import hashlib

        from .tuning.distributed import reshard

        reshard(self.model)  # a sharded model's own shards, not the weights it gathered
        digest = hashlib.sha256()
        sharded = False
        for param in self.model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor's own
            sharded = sharded or local is not param
            data = local.detach().cpu().contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy().tobytes())
        if not sharded:
            return digest.hexdigest()
        import torch.distributed as dist

        digests: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest.hexdigest())
        return hashlib.sha256("".join(digests).encode()).hexdigest()

    def _check(self, name: str) -> str:
        if name not in self.adapters:
            raise UserError(f"no adapter named {name!r} is loaded")
        return name
