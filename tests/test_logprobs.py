"""Log-probabilities from the engine: of each new token under the distribution it was drawn from,
and of each prompt token (echo), checked against one-row forwards of the untouched model."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.adapters import Adapter
from softprompt.engine import Engine, EngineConfig, RequestError, SamplingParams

PROMPTS = ["i want you to act as a", "be kind", "there are two nice things that should matter"]


@pytest.fixture()
def served(tiny_model_dir):
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=8))
    rows = torch.randn(3, base.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    engine.add_adapter("a", Adapter("a", rows * 4))
    return base, engine, {"a": rows * 4}


def _logits(base, raw, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32 logits of one unpadded row: the adapter's rows, then ``ids``."""
    embed = base.model.get_input_embeddings()
    with torch.no_grad():
        parts = ([raw] if raw is not None else []) + [embed(torch.tensor(ids))]
        logits = base.model(inputs_embeds=torch.cat(parts)[None]).logits[0].float()
    return logits[-len(ids) :]


@pytest.mark.parametrize("adapter", [None, "a"])
def test_greedy_tokens_carry_their_log_probabilities_and_alternatives(served, adapter):
    base, engine, raws = served
    params = SamplingParams(max_new_tokens=5, logprobs=3, ignore_eos=True)
    plain = SamplingParams(max_new_tokens=5, ignore_eos=True)
    # A batch mixing rows that ask and rows that do not: the tokens do not change.
    done = engine.generate(PROMPTS * 2, [adapter] * 6, [params] * 3 + [plain] * 3)
    for c, twin in zip(done[:3], done[3:], strict=True):
        assert c.token_ids == twin.token_ids and twin.logprobs is None
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 5
    for prompt, c in zip(PROMPTS, done[:3], strict=True):
        ids = base.tokenizer(prompt)["input_ids"] + c.token_ids
        logits = _logits(base, raws.get(adapter or ""), ids)
        logits[:, base.tokenizer.eos_token_id] = float("-inf")  # ignore_eos blocks it
        logp = logits.log_softmax(-1)
        start = len(ids) - len(c.token_ids) - 1
        for t, entry in enumerate(c.logprobs):
            row = logp[start + t]
            assert entry.token == c.token_ids[t]
            assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-4)
            values, top = row.topk(3)
            assert [i for i, _ in entry.top] == top.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
            assert entry.top[0][0] == entry.token  # greedy: the token is the most likely


def test_sampled_logprobs_are_of_the_distribution_drawn_from(served):
    base, engine, _ = served
    params = SamplingParams(
        max_new_tokens=4, temperature=0.7, top_p=0.8, seed=5, logprobs=2, ignore_eos=True
    )
    (c,) = engine.generate([PROMPTS[0]], [None], params)
    ids = base.tokenizer(PROMPTS[0])["input_ids"] + c.token_ids
    logits = _logits(base, None, ids)
    logits[:, base.tokenizer.eos_token_id] = float("-inf")  # ignore_eos blocks it
    start = len(ids) - len(c.token_ids) - 1
    for t, entry in enumerate(c.logprobs):
        probs = (logits[start + t] / 0.7).softmax(-1)
        ranked, order = probs.sort(descending=True)
        keep = (ranked.cumsum(-1) - ranked) < 0.8
        kept = ranked * keep
        drawn = torch.zeros_like(probs).scatter(0, order, kept / kept.sum())
        assert math.exp(entry.logprob) == pytest.approx(float(drawn[entry.token]), rel=1e-3)
        assert sum(math.exp(v) for _, v in entry.top) <= 1 + 1e-5
        assert all(math.exp(v) == pytest.approx(float(drawn[i]), rel=1e-3) for i, v in entry.top)


@pytest.mark.parametrize("adapter", [None, "a"])
def test_prompt_logprobs_score_each_prompt_token_after_the_ones_before(served, adapter):
    base, engine, raws = served
    echo = SamplingParams(max_new_tokens=2, prompt_logprobs=True, logprobs=2)
    # Echo rows beside plain ones of other lengths: both get the same tokens as alone.
    mixed = engine.generate(PROMPTS, [adapter] * 3, [echo, SamplingParams(max_new_tokens=2), echo])
    alone = engine.generate([PROMPTS[1]], [adapter], SamplingParams(max_new_tokens=2))
    assert mixed[1].token_ids == alone[0].token_ids and mixed[1].prompt_logprobs is None
    for prompt, c in ((PROMPTS[0], mixed[0]), (PROMPTS[2], mixed[2])):
        ids = base.tokenizer(prompt)["input_ids"]
        logp = _logits(base, raws.get(adapter or ""), ids).log_softmax(-1)
        assert c.prompt_logprobs is not None and len(c.prompt_logprobs) == len(ids)
        assert c.prompt_logprobs[0] is None
        for t in range(1, len(ids)):
            entry = c.prompt_logprobs[t]
            assert entry.token == ids[t]
            assert entry.logprob == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-4)
            assert [i for i, _ in entry.top] == logp[t - 1].topk(2).indices.tolist()


def test_logprobs_out_of_range_are_refused():
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(RequestError, match="logprobs must be from 0 to 20"):
            SamplingParams(logprobs=bad)
