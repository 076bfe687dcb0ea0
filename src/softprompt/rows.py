"""Token rows and their loss, the one definition training and evaluation share.

A row is ``[virtual ids][text ids]`` with a mark per text token saying whether the loss covers
it (``layout``: a completion, an assistant turn, or every token of a plain text, and the EOS
where the text really ends). ``training_rows`` builds them, ``batch_loss`` scores a batch of them
in one forward (``SoftPromptModel.scored_logits``); ``tuning.train`` steps on that loss and
``insight.evaluate`` reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import Example, as_example, pad_left
from .layout import example_layout
from .prompt import SoftPromptModel

Row = tuple[list[int], int, list[bool]]
"""``(ids, n_virtual, scored)``: one row's token ids, virtual ids first, how many of them there
are, and for each text token whether the loss covers it."""


MAX_LENGTH_CAP = 256
"""The most text tokens a row gets when ``max_length`` is left to the data."""


def fitting_length(
    spm: SoftPromptModel, texts: Sequence[str | Example], cap: int = MAX_LENGTH_CAP
) -> int:
    """Text tokens the longest example needs with its EOS, at most ``cap`` (at least 2)."""
    if not texts:
        return 2
    plain = [t for t in texts if isinstance(t, str)]
    lengths = [len(row) + 1 for row in spm.tokenizer(plain)["input_ids"]] if plain else []
    lengths += [
        len(example_layout(spm.tokenizer, t, 1 << 30).ids) for t in texts if isinstance(t, Example)
    ]
    return max(2, min(cap, max(lengths)))


def training_rows(
    spm: SoftPromptModel, texts: Sequence[str | Example], adapter: str | None, max_length: int
) -> tuple[list[Row], int]:
    """Rows ``[virtual][text][eos]`` of at most ``max_length`` text tokens, and how many were cut.

    An example that fits with its EOS keeps it. A longer one loses the start of what is not
    scored first (``layout``); if that is not enough it is cut to ``max_length`` tokens and gets
    no EOS: the prompt must not learn to stop mid-sentence, and eval must not score an end that
    is not there.
    """
    virtual = spm.virtual_ids(adapter)
    rows, cut = [], 0
    for text in texts:
        layout = example_layout(spm.tokenizer, as_example(text), max_length)
        cut += layout.cut
        rows.append((virtual + layout.ids, len(virtual), layout.scored))
    return rows, cut


def scored_tokens(rows: list[Row]) -> tuple[int, int]:
    """Text tokens the loss covers, and all text tokens, over ``rows``."""
    return sum(sum(r[2]) for r in rows), sum(len(r[2]) for r in rows)


def batch_loss(
    spm: SoftPromptModel, rows: list[Row], skip_first: bool, per_row: bool = False
) -> Any:
    """Summed cross-entropy over the text tokens of ``rows`` and how many tokens were scored.

    With ``per_row``, one sum per row (a float32 tensor) and a list of per-row counts instead.
    ``skip_first`` leaves out each row's first text token (see the module docstring). Logits
    are computed only where a token is scored (``SoftPromptModel.scored_logits``), not at the
    virtual tokens, the padding or the last position.
    """
    # A prefix adapter's virtual tokens are keys/values, not inputs: no position before its
    # first text token predicts it, so that token is never scored for such a row.
    rows, prefixes = spm.row_prefixes(rows)
    batch = pad_left([row[0] for row in rows], spm.tokenizer.pad_token_id)
    labels = batch["input_ids"].clone()
    length = labels.shape[1]
    for i, (ids, n_virtual, marks) in enumerate(rows):
        first_text = length - len(ids) + n_virtual
        skip = skip_first or prefixes[i] is not None
        labels[i, : first_text + (1 if skip else 0)] = -100
        unscored = [first_text + j for j, s in enumerate(marks) if not s]
        if unscored:
            labels[i, unscored] = -100
    # Position t predicts token t + 1.
    targets = labels[:, 1:]
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = targets != -100
    device = spm.device
    logits = spm.scored_logits(
        {k: v.to(device, non_blocking=True) for k, v in batch.items()},
        scored.to(device, non_blocking=True),
        prefixes,
    )  # (N, V)
    wanted = targets[targets != -100].to(device, non_blocking=True)
    if not per_row:
        total = F.cross_entropy(logits.float(), wanted, reduction="sum")
        return total, int(wanted.numel())
    per_token = F.cross_entropy(logits.float(), wanted, reduction="none")
    counts = (targets != -100).sum(dim=1)
    row_of = torch.repeat_interleave(torch.arange(len(rows)), counts).to(device)
    sums = per_token.new_zeros(len(rows)).index_add(0, row_of, per_token)
    return sums, counts.tolist()
