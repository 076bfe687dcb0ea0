from __future__ import annotations

import pytest
import torch

from softprompt.errors import UserError
from softprompt.generate import GenerateConfig, Request, _seen_tokens, generate, generate_ids
from softprompt.prompt import Adapter

PROMPTS = [
    "i want you to act as a",
    "be kind",
    "there are two nice things that should matter",
    "the mountain",
    "hope",
    "my first request is to help me with courage and hope every",
]


def _with_adapters(spm):
    torch.manual_seed(1)
    # Large rows so the adapters visibly change the tiny model's greedy output.
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size) * 4))
    spm.add_adapter(Adapter("b", torch.randn(5, spm.hidden_size) * 4))
    return spm


def _requests():
    return [Request(p, a) for p in PROMPTS for a in (None, "a", "b")]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_output_does_not_depend_on_batching(spm, penalty):
    _with_adapters(spm)
    config = GenerateConfig(max_new_tokens=12, repetition_penalty=penalty)
    together = generate(spm, _requests(), config, batch_size=16)
    alone = generate(spm, _requests(), config, batch_size=1)
    assert together == alone
    # The adapters do change outputs, so the comparison above is not vacuous.
    assert len({together[i] for i in range(3)}) > 1


def _reference(model, pad_id: int, eos_id: int, rows, penalty: float, max_new_tokens: int):
    """transformers' own generate() on the untouched base model: each row's raw adapter rows,
    then its text's embeddings, left padded into one batch.

    ``input_ids`` ride along only for the repetition penalty. Where the prompt is virtual or
    padding they hold the row's first text token, which the penalty covers anyway (it applies
    once per distinct id), so exactly the row's real tokens are penalised.
    """
    embed = model.get_input_embeddings()
    length = max(len(text) + (0 if raw is None else raw.shape[0]) for raw, text in rows)
    ids, embeds, mask = [], [], []
    with torch.no_grad():
        for raw, text in rows:
            virtual = 0 if raw is None else raw.shape[0]
            pad = length - virtual - len(text)
            parts = [embed(torch.tensor([pad_id] * pad, dtype=torch.long))]
            if raw is not None:
                parts.append(raw)
            parts.append(embed(torch.tensor(text)))
            embeds.append(torch.cat(parts))
            ids.append([text[0]] * (pad + virtual) + text)
            mask.append([0] * pad + [1] * (virtual + len(text)))
        out = model.generate(
            input_ids=torch.tensor(ids),
            inputs_embeds=torch.stack(embeds),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    completions = []
    for row in out[:, length:].tolist():
        completions.append(row[: row.index(eos_id)] if eos_id in row else row)
    return completions


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_matches_reference_generate_on_a_padded_mixed_batch(tiny_model_dir, penalty):
    """Our mixed-adapter decode loop equals transformers' generate() with the adapter's raw
    rows prepended through inputs_embeds, over one left-padded mixed batch."""
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    torch.manual_seed(1)
    raw = {"a": torch.randn(3, 16) * 4, "b": torch.randn(5, 16) * 4}
    untouched = load_base_model(str(tiny_model_dir))
    spm = SoftPromptModel(load_base_model(str(tiny_model_dir)))
    for name, rows in raw.items():
        spm.add_adapter(Adapter(name, rows))
    requests = _requests()[:9]
    tok = spm.tokenizer
    reference = _reference(
        untouched.model,
        tok.pad_token_id,
        tok.eos_token_id,
        [(raw.get(r.adapter or ""), spm.text_ids(r.prompt)) for r in requests],
        penalty,
        10,
    )
    config = GenerateConfig(max_new_tokens=10, repetition_penalty=penalty)
    ours = generate_ids(spm, [spm.encode(r.prompt, r.adapter) for r in requests], config)
    assert ours == reference
    assert len({tuple(c) for c in ours}) > 3  # adapters and prompts do change the outputs
    assert max(len(c) for c in ours) == 10


def test_seen_tokens_leave_out_padding_and_virtual_ids():
    vocab = 10
    ids = torch.tensor([[1, 1, 12, 3, 4], [0, 5, 10, 11, 5]])  # pads are id 1 and 0 here
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    seen = _seen_tokens(ids, mask, vocab)
    assert seen.shape == (2, vocab)
    assert seen[0].nonzero().flatten().tolist() == [3, 4]
    assert seen[1].nonzero().flatten().tolist() == [5]


def test_repetition_penalty_discourages_repeats(spm):
    plain = generate_ids(
        spm, [spm.encode("be kind be kind be kind", None)], GenerateConfig(max_new_tokens=20)
    )[0]
    penalised = generate_ids(
        spm,
        [spm.encode("be kind be kind be kind", None)],
        GenerateConfig(max_new_tokens=20, repetition_penalty=100.0),
    )[0]
    assert len(set(penalised)) == len(penalised)  # nothing repeats under a huge penalty
    assert plain != penalised


def test_tiny_top_p_samples_the_greedy_token(spm):
    _with_adapters(spm)
    greedy = generate(spm, _requests(), GenerateConfig(max_new_tokens=8))
    nucleus = generate(
        spm, _requests(), GenerateConfig(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=3)
    )
    assert nucleus == greedy


def test_a_sampled_completion_does_not_depend_on_its_batch_mates(spm):
    _with_adapters(spm)
    config = GenerateConfig(max_new_tokens=10, temperature=1.2, seed=5)
    everything = _requests()
    together = generate(spm, everything, config, batch_size=4)
    for i in (0, 4, 11, 17):
        alone = generate(spm, [everything[i]], config)[0]
        assert alone == together[i]
    # Its own seed decides: the same request with another seed samples something else.
    reseeded = [Request(r.prompt, r.adapter, seed=99) for r in everything]
    assert generate(spm, reseeded, config, batch_size=4) != together


def test_sampling_is_seeded(spm):
    _with_adapters(spm)
    config = GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = generate(spm, _requests()[:6], config)
    assert first == generate(spm, _requests()[:6], config)
    other = generate(
        spm, _requests()[:6], GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8)
    )
    assert other != first


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"repetition_penalty": 0},
    ],
)
def test_bad_generation_options(kwargs):
    with pytest.raises(UserError):
        GenerateConfig(**kwargs)
