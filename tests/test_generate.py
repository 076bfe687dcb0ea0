from __future__ import annotations

import pytest
import torch

from softprompt.errors import UserError
from softprompt.generate import GenerateConfig, Request, generate, generate_ids
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


def test_matches_reference_generate_with_inputs_embeds(spm):
    """Our decode loop equals transformers' generate() with the prompt rows prepended."""
    _with_adapters(spm)
    config = GenerateConfig(max_new_tokens=10)
    for request in _requests()[:6]:
        ids = spm.encode(request.prompt, request.adapter)
        embeds = spm.embed(torch.tensor([ids]))
        reference = spm.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=spm.tokenizer.eos_token_id,
            pad_token_id=spm.tokenizer.pad_token_id,
        )
        ours = generate_ids(spm, [ids], config)[0]
        expected = reference[0].tolist()
        if spm.tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(spm.tokenizer.eos_token_id)]
        assert ours == expected


def test_repetition_penalty_ignores_virtual_ids(spm):
    # Virtual ids lie beyond the vocabulary: penalising them by id would index out of range.
    _with_adapters(spm)
    out = generate(
        spm, [Request("be kind", "b")], GenerateConfig(max_new_tokens=5, repetition_penalty=2.0)
    )
    assert isinstance(out[0], str)


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
