"""Long prompts and shared prefixes: prompts computed in chunks within a token budget per step,
prompt text reused from the prefix cache, and running streams that keep getting tokens."""

from __future__ import annotations

import pytest
import torch

from softprompt.adapters import Adapter
from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.engine.prefix_cache import PrefixCache
from softprompt.engine.scheduler import Scheduler
from softprompt.engine.sequence import Sequence, Status
from softprompt.tuning.init import init_prefix
from test_prefix import prefix_adapter

WORDS = "be kind every day hope and courage the mountain is there my first request".split()
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def _text(n: int, seed: int) -> list[int]:
    """``n`` token ids of words in an order set by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [int(i) for i in torch.randint(4, 55, (n,), generator=g)]


def _engine(spm, **config) -> Engine:
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size, generator=_gen(1)) * 4))
    spm.add_adapter(prefix_adapter(spm, "deep", init_prefix(spm.base, 3, "vocab", seed=1) * 1.5))
    return Engine.from_softprompt(spm, EngineConfig(**config))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(engine: Engine, prompts, adapters, params=GREEDY) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, adapters, params)]


@pytest.fixture()
def prompts():
    # Lengths around and well past the budgets below, a shared start, the same prompt twice.
    shared = _text(40, 0)
    return [
        _text(5, 1),
        _text(77, 2),
        shared + _text(9, 3),
        shared + _text(30, 4),
        _text(130, 5),
        shared + _text(9, 3),
    ]


def test_prompts_computed_in_chunks_give_the_tokens_of_a_whole_prefill(spm, prompts):
    adapters = [None, "a", "deep", "a", "deep", None]
    whole = _engine(spm, max_prefill_tokens=4096, prefix_cache_mb=0)
    expected = _tokens(whole, prompts, adapters)
    for budget in (1, 7, 32):
        chunked = Engine(spm.model, spm.tokenizer, EngineConfig(
            max_prefill_tokens=budget, prefix_cache_mb=0, max_batch_size=3
        ))  # fmt: skip
        for name, adapter in spm.adapters.items():
            chunked.add_adapter(name, adapter)
        assert _tokens(chunked, prompts, adapters) == expected, budget
        assert chunked.stats.prompt_tokens == sum(len(p) for p in prompts)


def test_chunked_prompt_log_probabilities_equal_a_whole_prefills(spm, prompts):
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=True, logprobs=2)
    whole = _engine(spm, max_prefill_tokens=4096)
    chunked = Engine.from_softprompt(spm, EngineConfig(max_prefill_tokens=16))
    for ids, adapter in zip(prompts[:3], [None, "a", "deep"], strict=True):
        a = whole.generate([ids], [adapter], params)[0].prompt_logprobs
        b = chunked.generate([ids], [adapter], params)[0].prompt_logprobs
        assert len(a) == len(b) == len(ids)
        for x, y in zip(a[1:], b[1:], strict=True):
            assert x.token == y.token
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_a_running_stream_gets_a_token_every_step_while_a_long_prompt_joins(spm):
    engine = _engine(spm, max_prefill_tokens=16, max_batch_size=4)
    running = engine.submit(_text(6, 7), "a", SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()
    long = engine.submit(_text(150, 8), "deep", GREEDY)
    steps = 0
    while not long.seq.output_ids:
        before = len(running.seq.output_ids)
        engine.step()
        steps += 1
        assert len(running.seq.output_ids) == before + 1  # never a step without its token
        assert len(engine.scheduler.prefilling) + len(engine.scheduler.running) <= 2
    assert steps == -(-150 // 16)  # 150 tokens at 16 a step
    assert engine.stats.longest_gap.count == 0  # neither has finished yet
    running.result(), long.result()
    assert engine.stats.longest_gap.count == 2
    assert engine.stats.time_to_first_token.count == 2


def test_a_prefix_cache_hit_gives_the_tokens_computed_afresh(spm, prompts):
    adapters = [None, "a", "deep", "deep", "a", "deep"]
    fresh = _engine(spm, prefix_cache_mb=0)
    expected = _tokens(fresh, prompts, adapters)
    cached = Engine.from_softprompt(spm, EngineConfig(prefix_cache_block=8))
    for prompt, adapter, tokens in zip(prompts, adapters, expected, strict=True):
        assert _tokens(cached, [prompt], [adapter]) == [tokens]  # one by one: later ones hit
    stats = cached.prefix_cache.stats
    assert stats.hit_tokens == 40 + 48  # the shared start, then the same prompt again
    # Again, all of them at once: now every prompt hits, all but its last (partial) block.
    hits = stats.hit_tokens
    assert _tokens(cached, prompts, adapters) == expected
    assert stats.hit_tokens - hits == sum((len(p) - 1) // 8 * 8 for p in prompts)
    # Chunked and cached together.
    both = Engine.from_softprompt(spm, EngineConfig(prefix_cache_block=8, max_prefill_tokens=5))
    assert _tokens(both, prompts, adapters) == expected
    assert _tokens(both, prompts, adapters) == expected


def test_cached_text_is_reused_only_after_the_same_adapter_and_the_same_tokens(spm):
    engine = _engine(spm, prefix_cache_block=8)
    stats = engine.prefix_cache.stats
    first = _text(40, 11)
    engine.generate([first], ["a"], GREEDY)
    engine.generate([first], ["deep"], GREEDY)
    engine.generate([first], [None], GREEDY)
    assert stats.hit_tokens == 0  # each adapter's keys differ
    engine.generate([first[:20] + [5] + first[21:]], ["a"], GREEDY)
    assert stats.hit_tokens == 16  # the two blocks before the changed token
    replaced = torch.randn(3, spm.hidden_size, generator=_gen(2))
    engine.remove_adapter("a")
    engine.add_adapter("a", Adapter("a", replaced))  # the same name, other rows
    before = stats.hit_tokens
    engine.generate([first], ["a"], GREEDY)
    assert stats.hit_tokens == before


def test_the_prefix_cache_stays_within_its_memory_and_evicts_the_least_recent(spm):
    engine = _engine(spm, prefix_cache_block=8, prefix_cache_mb=8 / 1024)  # 8 KiB
    cache = engine.prefix_cache
    block_bytes = 2 * 2 * 1 * 8 * 8 * 4  # keys and values, 2 layers, 1 head, 8 dims, 8 tokens
    assert cache.max_bytes // block_bytes == 8
    for seed in range(6):
        engine.generate([_text(33, 20 + seed)], [None], GREEDY)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache.blocks) == 8
    assert cache.stats.evicted_blocks == 6 * 4 - 8
    # The newest prompt's blocks are kept, the oldest's are gone.
    engine.generate([_text(33, 25)], [None], GREEDY)
    engine.generate([_text(33, 20)], [None], GREEDY)
    assert cache.stats.hit_tokens == 32


def test_prefix_cache_blocks_are_found_from_the_first_on():
    cache = PrefixCache(block=2, max_bytes=1 << 20)
    layer = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    ids = [1, 2, 3, 4, 5, 6, 7]
    cache.store(b"x", ids, 0, [layer], [layer + 1], column=2)
    assert len(cache.blocks) == 3  # the last, partial block is not kept
    found = cache.lookup(b"x", ids, len(ids) - 1)
    assert len(found) == 3
    torch.testing.assert_close(found[1].keys[0], layer[:, 4:6])  # tokens 2-3 at columns 4-5
    assert len(cache.lookup(b"x", [1, 2, 9, 4, 5, 6], 6)) == 1
    assert cache.lookup(b"y", ids, 7) == []
    assert len(cache.lookup(b"x", ids, 3)) == 1  # never past the limit
    off = PrefixCache(block=2, max_bytes=0)
    off.store(b"x", ids, 0, [layer], [layer], column=0)
    assert not off.blocks and off.lookup(b"x", ids, 7) == []


def test_the_scheduler_splits_its_budget_first_among_prompts_under_way():
    scheduler = Scheduler(max_batch_size=3, max_prefill_tokens=10)
    seqs = [Sequence([0] * n, None, SamplingParams()) for n in (25, 4, 3, 2)]
    for seq in seqs:
        scheduler.add(seq)
    done = {id(s): 0 for s in seqs}

    def remaining(seq):
        return len(seq.prompt_ids) - done[id(seq)]

    def run(plan):
        for seq, take in plan:
            done[id(seq)] += take
            if remaining(seq) == 0:
                scheduler.start([seq])
        return [(seqs.index(s), t) for s, t in plan]

    assert run(scheduler.plan(remaining)) == [(0, 10)]
    assert run(scheduler.plan(remaining)) == [(0, 10)]
    # The rest of the long one, a short one whole; the next would need a chunk of its own
    # beside the one under way: it waits.
    assert run(scheduler.plan(remaining)) == [(0, 5), (1, 4)]
    assert run(scheduler.plan(remaining)) == [(2, 3)]  # three admitted: the batch is full
    assert seqs[3].status is Status.WAITING
    seqs[1].finish("stop")
    scheduler.remove_finished()
    assert run(scheduler.plan(remaining)) == [(3, 2)]


def test_a_second_long_prompt_starts_after_the_first_and_reuses_its_start(spm):
    engine = _engine(spm, prefix_cache_block=8, max_prefill_tokens=16)
    system = _text(64, 30)
    first = engine.submit(system + _text(20, 31), "a", GREEDY)
    second = engine.submit(system + _text(20, 32), "a", GREEDY)
    engine.step()
    assert engine.scheduler.prefilling == [first.seq]  # the second waits for it
    first.result(), second.result()
    assert second.seq.reused == 64  # the shared start, computed once


def test_with_no_row_running_short_prompts_join_together_and_long_ones_still_chunk():
    scheduler = Scheduler(max_batch_size=8, max_prefill_tokens=10, idle_prefill_tokens=40)
    seqs = [Sequence([0] * n, None, SamplingParams()) for n in (8, 9, 30, 7)]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.plan(lambda seq: len(seq.prompt_ids))
    # Idle: 8 + 9 whole, the long one a chunk of 10, the last whole: 34 of 40.
    assert [(seqs.index(s), t) for s, t in plan] == [(0, 8), (1, 9), (2, 10), (3, 7)]
    scheduler.start([seqs[0]])  # a row runs now: the budget is 10 a step
    plan = scheduler.plan(lambda seq: len(seq.prompt_ids) - (10 if seq is seqs[2] else 0))
    assert [(seqs.index(s), t) for s, t in plan] == [(1, 9), (2, 1)]
