"""What a soft prompt's rows look like next to the vocabulary (Lester et al. 2021, section 7).

For each virtual token: the nearest vocabulary tokens by cosine similarity, and its norm placed
in the distribution of the vocabulary's row norms (a row far outside it is one the model has
never seen the like of, as with PEFT's unscaled RANDOM init).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..adapters import Adapter
from ..prompt import SoftPromptModel


@dataclass
class Neighbour:
    token: str
    id: int
    cosine: float


@dataclass
class VirtualToken:
    index: int
    norm: float
    norm_z: float
    """(norm - mean vocabulary norm) / its standard deviation."""
    norm_percentile: float
    """Share of vocabulary rows with a smaller norm, in percent."""
    nearest: list[Neighbour]


@dataclass
class Inspection:
    adapter: str
    vocab_norm_mean: float
    vocab_norm_std: float
    tokens: list[VirtualToken]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def inspect_adapter(spm: SoftPromptModel, adapter: Adapter, top_k: int = 5) -> Inspection:
    """Nearest vocabulary tokens and norm statistics for every row of ``adapter``."""
    vocab = spm.embedding.weight.detach().float()  # (V, D), on the model's device
    rows = adapter.weights.detach().to(vocab)  # (n, D)
    vocab_norms = vocab.norm(dim=1)  # (V,)
    mean, std = float(vocab_norms.mean()), float(vocab_norms.std())
    cosine = (
        torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(vocab, dim=1).T
    )  # (n, V)
    best = cosine.topk(min(top_k, vocab.shape[0]), dim=1)
    sorted_norms = vocab_norms.sort().values
    tokens = []
    for i, row in enumerate(rows):
        norm = float(row.norm())
        below = int(torch.searchsorted(sorted_norms, row.norm()))
        nearest = [
            Neighbour(token=str(spm.tokenizer.decode([int(t)])), id=int(t), cosine=float(c))
            for c, t in zip(best.values[i], best.indices[i], strict=True)
        ]
        tokens.append(
            VirtualToken(
                index=i,
                norm=norm,
                norm_z=(norm - mean) / std if std > 0 else 0.0,
                norm_percentile=100.0 * below / len(sorted_norms),
                nearest=nearest,
            )
        )
    return Inspection(adapter.name, mean, std, tokens)


@dataclass
class LayerNorms:
    layer: int
    key_norm: float
    """Mean norm of the prefix's keys at this layer (one vector per head and virtual token)."""
    model_key_norm: float
    """Mean norm of the keys the model itself computes for real tokens at this layer."""
    value_norm: float
    model_value_norm: float


@dataclass
class PrefixInspection:
    adapter: str
    method: str
    virtual_tokens: int
    layers: list[LayerNorms]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def inspect_prefix(spm: SoftPromptModel, adapter: Adapter, sample: int = 64) -> PrefixInspection:
    """Per-layer key and value norms of a prefix adapter against the model's own for ``sample``
    random vocabulary tokens in a row: a prefix far off that scale is one attention has never
    met the like of (as with PEFT's N(0, 1) start)."""
    from ..prefix import model_kv, norms
    from ..tuning.init import init_prompt

    shape = spm.prefix_shape
    key_norms, value_norms = norms(adapter.weights.detach(), shape)
    rows = init_prompt(spm.base, min(sample, spm.vocab_size), "vocab", seed=0)
    keys, values = model_kv(spm.model, rows)
    model_keys = [float(k.norm(dim=-1).mean()) for k in keys]
    model_values = [float(v.norm(dim=-1).mean()) for v in values]
    layers = [
        LayerNorms(i, key_norms[i], model_keys[i], value_norms[i], model_values[i])
        for i in range(shape.layers)
    ]
    return PrefixInspection(adapter.name, "prefix", adapter.num_virtual_tokens, layers)
