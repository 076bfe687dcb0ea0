"""The engine on the tiny model: requests joining and leaving a running batch of mixed adapters.

Outputs are checked against each request run alone and against transformers' own ``generate``
on the untouched base model with the adapter's rows prepended through ``inputs_embeds``.
"""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import pinned
from softprompt.adapters import Adapter
from softprompt.engine import Engine, EngineConfig, RequestError, SamplingParams
from softprompt.generation import Request, generate
from softprompt.models import load_base_model
from softprompt.prompt import SoftPromptModel

PROMPTS = [
    "i want you to act as a",
    "be kind",
    "there are two nice things that should matter",
    "the mountain",
    "hope",
    "my first request is to help me with courage and hope every",
]
ADAPTERS = [None, "a", "b"]


def _raw(hidden: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Large rows so the adapters visibly change the tiny model's greedy output.
    return {
        "a": torch.randn(3, hidden, generator=generator) * 4,
        "b": torch.randn(5, hidden, generator=generator) * 4,
    }


def _engine(spm, **config) -> Engine:
    engine = Engine(spm.model, spm.tokenizer, EngineConfig(**config))
    for name, rows in _raw(spm.hidden_size).items():
        engine.add_adapter(name, Adapter(name, rows))
    return engine


def _ids(spm, prompt: str) -> list[int]:
    return spm.text_ids(prompt)


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
@pytest.mark.parametrize(
    "packed", ["no", "onednn", "onednn+mkl", "panels", "fixed-shape", "torch-decode"]
)
def test_matches_reference_generate_on_a_mixed_batch(tiny_model_dir, penalty, packed):
    from softprompt.models import load_base_model

    untouched = load_base_model(str(tiny_model_dir))
    served = load_base_model(str(tiny_model_dir))
    tok = served.tokenizer
    cases = [(p, a) for p in PROMPTS for a in ADAPTERS]
    # A batch as large as the cases: the first decode steps are full batches, which take MKL's
    # path when its weights are packed for that size.
    # fixed-shape: the GPU's decode step (whole-cache attention, tensor-indexed writes, batch
    # rounded up to a bucket), run eagerly; 20 slots for 18 cases round 18 rows up to 20.
    # torch-decode: the lean forward's decode steps on PyTorch's kernels, not the fused C ones
    # (which every other packed case runs where a C compiler is found).
    # panels: every linear layer, prefill and decode, on the C kernel's panel linear.
    if packed == "panels" and not shutil.which("cc"):
        pytest.skip("the panel linears need a C compiler")
    config = EngineConfig(
        max_batch_size=len(cases) + (2 if packed == "fixed-shape" else 0),
        packed_weights=packed != "no",
        full_batch_pack=packed in ("onednn+mkl", "torch-decode"),
        graphs=packed == "fixed-shape",
        cpu_kernels=False if packed == "torch-decode" else (True if shutil.which("cc") else None),
        panel_linear=packed == "panels",
    )
    engine = Engine(served.model, served.tokenizer, config)
    assert (engine.runner.graphed is not None) == (packed == "fixed-shape")
    lean = engine.runner.lean
    assert (lean is not None) == (packed != "no")
    if lean is not None and packed != "fixed-shape" and shutil.which("cc"):
        assert (lean.kernels is not None) == (packed != "torch-decode")
    if lean is not None:
        mkl = config.max_batch_size if packed in ("onednn+mkl", "torch-decode") else None
        assert lean.lm_head.full_batch == mkl
        assert lean.lm_head.batch_packed is None  # no MKL copy before a full batch needs it
        on_panels = [p.panels is not None for p in lean.packed_linears()]
        assert on_panels == [packed == "panels"] * len(on_panels)
        if packed == "panels":  # the panels are the only copy kept
            assert all(p.packed is None for p in lean.packed_linears())
    raw = _raw(16)
    for name, rows in raw.items():
        engine.add_adapter(name, Adapter(name, rows))
    reference = _reference(
        untouched.model,
        tok.pad_token_id,
        tok.eos_token_id,
        [(raw.get(a or ""), tok(p)["input_ids"]) for p, a in cases],
        penalty,
        10,
    )
    params = SamplingParams(max_new_tokens=10, repetition_penalty=penalty)
    ours = engine.generate([p for p, _ in cases], [a for _, a in cases], params)
    assert [c.token_ids for c in ours] == reference
    if packed in ("onednn+mkl", "torch-decode"):
        # The full batches did run on MKL's copy, made when first needed.
        assert lean is not None and lean.lm_head.batch_packed is not None
    assert len({tuple(c) for c in reference}) > 6  # adapters and prompts do change the outputs
    assert max(len(c) for c in reference) == 10
    # The caller's model is untouched: same modules, same weights.
    for (name, mine), theirs in zip(
        served.model.state_dict().items(), untouched.model.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name
    assert type(served.model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def _alone(engine: Engine, prompt: str, adapter: str | None, params: SamplingParams):
    return engine.generate([prompt], [adapter], params)[0]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.lists(
        st.tuples(
            st.sampled_from(range(len(PROMPTS))),
            st.sampled_from(ADAPTERS),
            st.integers(0, 12),  # arrival: the engine step before which it is submitted
            st.integers(1, 14),  # max new tokens
            st.booleans(),  # with a stop string taken from its own greedy output
        ),
        min_size=1,
        max_size=10,
    ),
    batch=st.integers(1, 6),
)
def test_arrivals_mid_flight_change_no_greedy_output(spm, data, batch):
    """Whatever arrives when, beside whatever adapters, each greedy output is its solo output."""
    engine = _engine(spm, max_batch_size=batch, max_prefill_tokens=16)
    solo = _engine(spm)
    plan = []
    for prompt_index, adapter, arrival, max_new, use_stop in data:
        prompt = PROMPTS[prompt_index]
        full = _alone(
            solo, prompt, adapter, SamplingParams(max_new_tokens=max_new, repetition_penalty=1.3)
        )
        words = full.text.split()
        stop = [words[len(words) // 2]] if use_stop and words else []
        params = SamplingParams(max_new_tokens=max_new, repetition_penalty=1.3, stop=stop)
        expected = full.text if not stop else full.text[: full.text.find(stop[0])]
        plan.append((arrival, prompt, adapter, params, expected))
    handles = [None] * len(plan)
    step = 0
    while any(h is None for h in handles) or engine.has_work():
        for i, (arrival, prompt, adapter, params, _) in enumerate(plan):
            if handles[i] is None and arrival <= step:
                handles[i] = engine.submit(prompt, adapter, params)
        engine.step()
        step += 1
        assert len(engine.scheduler.running) <= batch
    for handle, (*_, expected) in zip(handles, plan, strict=True):
        completion = handle.result()
        assert completion.text == expected
        assert completion.finish_reason in ("stop", "length")


def test_fixed_shape_decode_steps_match_while_rows_join_leave_and_the_cache_grows(spm):
    """The GPU's decode step (run eagerly here) gives every request its ordinary output while
    requests join mid-flight, the batch shrinks through its buckets, and the cache doubles
    (new buffers) and drops columns (rows shift)."""
    plain = _engine(spm, max_batch_size=6)
    fixed = _engine(spm, max_batch_size=6, graphs=True)
    assert fixed.runner.graphed is not None and plain.runner.graphed is None
    plan = [(i % len(PROMPTS), ADAPTERS[i % 3], 3 * i, 20 + 13 * i) for i in range(8)]
    results, peak = [], 0
    for engine in (plain, fixed):
        handles: list = [None] * len(plan)
        step = 0
        while any(h is None for h in handles) or engine.has_work():
            for i, (prompt, adapter, arrival, new) in enumerate(plan):
                if handles[i] is None and arrival <= step:
                    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
                    handles[i] = engine.submit(PROMPTS[prompt], adapter, params)
            engine.step()
            peak = max(peak, engine.cache.capacity)
            step += 1
        results.append([h.result().token_ids for h in handles])
    assert results[0] == results[1]
    assert peak > 64  # it grew while running
    assert max(len(r) for r in results[1]) == 20 + 13 * 7


def test_a_short_request_does_not_wait_for_a_long_one(spm):
    engine = _engine(spm, max_batch_size=4)
    long = engine.submit("be kind", "a", SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()
    engine.step()
    short = engine.submit("hope", "b", SamplingParams(max_new_tokens=2, ignore_eos=True))
    steps = 0
    while not short.seq.finished:
        engine.step()
        steps += 1
    assert steps <= 2
    assert not long.seq.finished  # it joined a running batch and left it first
    assert len(long.result().token_ids) == 40


def test_static_policy_admits_only_when_the_batch_is_empty(spm):
    engine = _engine(spm, max_batch_size=4, policy="static")
    first = engine.submit("be kind", "a", SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.step()
    second = engine.submit("hope", None, SamplingParams(max_new_tokens=2, ignore_eos=True))
    while not first.seq.finished:
        engine.step()
        assert not second.seq.output_ids
    assert second.result().token_ids


def test_each_prefix_is_computed_once_and_prefill_covers_only_text(spm):
    engine = _engine(spm, max_batch_size=8)
    calls = []
    build = engine.registry._build
    engine.registry._build = lambda adapters: (
        calls.append([a.name for a in adapters]) or build(adapters)
    )
    prompts = PROMPTS * 2
    adapters = ["a", "b", None] * 4
    engine.generate(prompts, adapters, SamplingParams(max_new_tokens=3))
    engine.generate(prompts, adapters, SamplingParams(max_new_tokens=3))
    assert calls == [["a", "b"]]  # both new prefixes in one forward, then reused
    text_tokens = sum(len(_ids(spm, p)) for p in prompts)
    assert engine.stats.prompt_tokens == 2 * text_tokens  # no virtual token is prefilled


def test_prefixes_computed_together_equal_each_computed_alone(spm):
    runner = _engine(spm).runner
    adapters = [Adapter(name, rows) for name, rows in _raw(spm.hidden_size).items()]  # 3 and 5 rows
    together = runner.prefixes(adapters)
    for adapter, prefix in zip(adapters, together, strict=True):
        alone = runner.prefix(adapter)
        assert prefix.length == alone.length == adapter.num_virtual_tokens
        pairs = zip(prefix.keys + prefix.values, alone.keys + alone.values, strict=True)
        for mine, theirs in pairs:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_a_retrained_adapter_gets_a_new_prefix(spm):
    rows = torch.nn.Parameter(_raw(16)["a"].clone(), requires_grad=False)
    engine = Engine(spm.model, spm.tokenizer)
    engine.add_adapter("live", Adapter("live", rows))
    before = _alone(engine, "be kind", "live", SamplingParams(max_new_tokens=8)).token_ids
    with torch.no_grad():
        rows.mul_(-1)  # what an optimizer step does: an in-place change
    after = _alone(engine, "be kind", "live", SamplingParams(max_new_tokens=8)).token_ids
    fresh = Engine(spm.model, spm.tokenizer)
    fresh.add_adapter("live", Adapter("live", rows.detach().clone()))
    assert after == _alone(fresh, "be kind", "live", SamplingParams(max_new_tokens=8)).token_ids
    assert after != before


def test_registry_keeps_at_most_max_resident_and_never_frees_a_pinned_adapter(spm, tmp_path):
    from softprompt.adapters import adapter_config, write_adapter_files

    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_resident_adapters=2))
    for i in range(4):
        folder = tmp_path / f"ad{i}"
        folder.mkdir()
        rows = torch.randn(2 + i, 16, generator=torch.Generator().manual_seed(i)) * 3
        write_adapter_files(folder, rows, adapter_config(Adapter(f"ad{i}", rows), "tiny", "random"))
        engine.add_adapter(f"ad{i}", folder)
    params = SamplingParams(max_new_tokens=3)
    first = {name: _alone(engine, "be kind", name, params).token_ids for name in engine.adapters()}
    assert engine.registry.resident() == ["ad2", "ad3"]
    held = engine.submit("hope", "ad0", SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    assert pinned(engine.registry, "ad0") == 1
    for name in ("ad1", "ad2", "ad3"):
        _alone(engine, "be kind", name, params)
    assert "ad0" in engine.registry.resident()  # pinned, so it stayed over the bound
    engine.remove_adapter("ad0")  # removed while running: the request still finishes
    assert "ad0" not in engine.adapters()
    assert len(held.result().token_ids) == 30
    assert "ad0" not in engine.registry.resident()
    assert len(engine.registry.resident()) <= 2
    with pytest.raises(RequestError, match="unknown adapter"):
        engine.submit("hope", "ad0")
    # Evicted adapters are read again from their folders and give the same output.
    again = {name: _alone(engine, "be kind", name, params).token_ids for name in engine.adapters()}
    assert again == {k: v for k, v in first.items() if k != "ad0"}


def test_adapters_cost_their_rows_and_prefix_only(spm):
    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_resident_adapters=100))
    params_before = sum(p.data_ptr() for p in spm.model.parameters())
    sizes = []
    for count in (1, 10):
        for i in range(len(engine.adapters()), count):
            engine.add_adapter(f"x{i}", Adapter(f"x{i}", torch.randn(4, 16)))
        for name in engine.adapters():
            _alone(engine, "hope", name, SamplingParams(max_new_tokens=1))
        sizes.append(engine.memory()["adapters"])
    config = spm.model.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * (16 // 2) * 4 + 16 * 4
    assert sizes == [4 * per_token, 40 * per_token]
    assert sum(p.data_ptr() for p in spm.model.parameters()) == params_before


def test_streams_sync_and_async_give_the_whole_text(spm):
    engine = _engine(spm)
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.3)
    whole = _alone(engine, PROMPTS[0], "a", params)
    pieces = list(engine.stream(PROMPTS[0], "a", params))
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert pieces[-1].finished and not any(p.finished for p in pieces[:-1])

    async def collect() -> list:
        return [out async for out in engine.astream(PROMPTS[0], "a", params)]

    try:
        streamed = asyncio.run(collect())
    finally:
        engine.stop()
    assert "".join(p.text for p in streamed) == whole.text


def test_stop_strings_never_leak_into_the_stream(spm):
    engine = _engine(spm)
    full = _alone(engine, PROMPTS[2], "b", SamplingParams(max_new_tokens=14)).text
    words = full.split()
    assert len(words) > 3
    stop = " ".join(words[2:4])
    pieces = list(engine.stream(PROMPTS[2], "b", SamplingParams(max_new_tokens=14, stop=[stop])))
    text = "".join(p.text for p in pieces)
    assert text == full[: full.find(stop)]
    assert pieces[-1].finish_reason == "stop"


def test_cancel_stops_one_request_only(spm):
    engine = _engine(spm, max_batch_size=4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    keep = engine.submit(PROMPTS[1], "b", params)
    drop = engine.submit(PROMPTS[3], "a", params)
    other = engine.submit(PROMPTS[4], None, params)
    for _ in range(3):
        engine.step()
    drop.cancel()
    waiting_engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_batch_size=1))
    late = waiting_engine.submit("hope", None, params)
    queued = waiting_engine.submit("be kind", None, params)
    queued.cancel()  # cancelled before it ever ran
    assert queued.result().finish_reason == "cancelled"
    assert late.result().token_ids
    result = drop.result()
    assert result.finish_reason == "cancelled" and 0 < len(result.token_ids) < 20
    assert keep.result().token_ids == _alone(engine, PROMPTS[1], "b", params).token_ids
    assert other.result().token_ids == _alone(engine, PROMPTS[4], None, params).token_ids


def test_sampling_depends_only_on_the_request_and_its_seed(spm):
    engine = _engine(spm, max_batch_size=4)
    cases = [(p, a) for p in PROMPTS for a in ADAPTERS]

    def run(seed_of) -> list[list[int]]:
        handles = [
            engine.submit(p, a, SamplingParams(max_new_tokens=10, temperature=1.2, seed=seed_of(i)))
            for i, (p, a) in enumerate(cases)
        ]
        return [h.result().token_ids for h in handles]

    together = run(lambda i: 5 + i)
    for i in (0, 4, 11, 17):
        params = SamplingParams(max_new_tokens=10, temperature=1.2, seed=5 + i)
        assert _alone(engine, *cases[i], params).token_ids == together[i]
    assert run(lambda i: 99 + i) != together
    tiny_top_p = [SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=3)] * len(
        cases
    )
    greedy = engine.generate(
        [p for p, _ in cases], [a for _, a in cases], SamplingParams(max_new_tokens=8)
    )
    nucleus = engine.generate([p for p, _ in cases], [a for _, a in cases], tiny_top_p)
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]


def test_repetition_penalty_and_min_new_tokens(spm):
    engine = Engine(spm.model, spm.tokenizer)
    plain = _alone(
        engine, "be kind be kind be kind", None, SamplingParams(max_new_tokens=20)
    ).token_ids
    penalised = _alone(
        engine,
        "be kind be kind be kind",
        None,
        SamplingParams(max_new_tokens=20, repetition_penalty=100.0),
    ).token_ids
    assert len(set(penalised)) == len(penalised)
    assert plain != penalised
    # A completion that ends early still gives min_new_tokens tokens. The tiny model rarely
    # ends by itself, so its third greedy token is made an end-of-sequence token here.
    unended = _alone(engine, "hope", None, SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.eos = sorted({*engine.eos, unended.token_ids[2]})
    short = _alone(engine, "hope", None, SamplingParams(max_new_tokens=30)).token_ids
    assert len(short) <= 2  # it ends early now (the check below always runs)
    forced = _alone(
        engine, "hope", None, SamplingParams(max_new_tokens=30, min_new_tokens=len(short) + 3)
    )
    assert len(forced.token_ids) >= len(short) + 3
    assert forced.token_ids[: len(short)] == short
    forced_long = _alone(engine, "hope", None, SamplingParams(max_new_tokens=25, ignore_eos=True))
    assert len(forced_long.token_ids) == 25 and forced_long.finish_reason == "length"


def test_a_tiny_temperature_or_top_p_samples_the_greedy_token(spm):
    """Found by schemathesis: dividing logits by 5e-324 gave NaN probabilities, and a top_p that
    is 0 in float32 dropped every token."""
    engine = _engine(spm)
    greedy = engine.generate(["be kind"], ["a"], SamplingParams(max_new_tokens=6))[0]
    for tiny in (
        SamplingParams(max_new_tokens=6, temperature=5e-324, seed=3),
        SamplingParams(max_new_tokens=6, temperature=1.0, top_p=5e-324, seed=3),  # 0 in float32
    ):
        sampled = engine.generate(["be kind"], ["a"], tiny)[0]
        assert sampled.finish_reason != "error", sampled.error
        assert sampled.token_ids == greedy.token_ids


@pytest.mark.parametrize("vocab", [7, 256, 1000, 1024, 49152, 50257])
def test_greedy_tokens_equal_argmax_with_ties_nan_and_infinities(vocab):
    """The CPU's chunked greedy pick is ``argmax`` exactly: the first of tied maxima, NaN first."""
    from softprompt.engine.sampling import greedy_tokens

    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(12, vocab, generator=generator)
    last = vocab - 1
    logits[1, [last, 0]] = 9.0  # tie across the ends: the first wins
    logits[2, [last // 2, last // 2 + 1, last]] = 9.0  # ties in one chunk and the next
    logits[3] = float("-inf")  # nothing allowed: index 0, as argmax gives
    logits[4, last // 3] = float("nan")
    logits[5, [last, last // 5]] = float("nan")  # the first NaN, not the last
    logits[6, last] = 50.0  # the max in the last (maybe partial) chunk
    logits[7] = 1.0  # all equal
    logits[8, [0, last]] = float("inf")
    chosen = greedy_tokens(logits)
    assert chosen.tolist() == logits.argmax(dim=-1).tolist()
    strided = torch.randn(5, 2 * vocab, generator=generator)[:, ::2]  # a non-contiguous view
    assert greedy_tokens(strided).tolist() == strided.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # found by schemathesis
        ({"repetition_penalty": 1e6}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_parameters(kwargs, field):
    with pytest.raises(RequestError) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == field


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(spm):
    engine = _engine(spm, max_new_tokens_cap=64)
    running = engine.submit(PROMPTS[0], "a", SamplingParams(max_new_tokens=12))
    engine.step()
    bad = [
        ({"prompt": "hope", "adapter": "nope"}, "unknown adapter"),
        ({"prompt": "hope " * 300}, "context"),
        ({"prompt": "hope", "params": SamplingParams(max_new_tokens=65)}, "cap"),
        ({"prompt": ""}, "no tokens"),
        ({"prompt": [1, 2, 10_000]}, "outside the vocabulary"),
        ({"prompt": [1, True]}, "token ids"),
    ]
    for kwargs, message in bad:
        with pytest.raises(RequestError, match=message):
            engine.submit(**kwargs)
    with pytest.raises(RequestError, match="token_dim"):
        engine.add_adapter("wide", Adapter("wide", torch.randn(2, 32)))
    with pytest.raises(RequestError, match="already registered"):
        engine.add_adapter("a", Adapter("a", torch.randn(2, 16)))
    assert (
        running.result().token_ids
        == _alone(engine, PROMPTS[0], "a", SamplingParams(max_new_tokens=12)).token_ids
    )


def test_a_request_that_breaks_the_model_fails_alone(spm):
    """The model raises for any row at position 40 or beyond: in prefill and in decode."""
    engine = _engine(spm, max_batch_size=8)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = [
        _alone(engine, p, a, params).token_ids for p, a in zip(PROMPTS, ADAPTERS * 2, strict=True)
    ]

    forward = engine.runner.forward

    def breaking(cache, rows, embeds, positions, new_valid, every=False):
        if int(positions.max()) >= 40:
            raise RuntimeError("boom at position 40")
        return forward(cache, rows, embeds, positions, new_valid, every)

    engine.runner.forward = breaking  # type: ignore[method-assign]
    long_prompt = "hope " * 45  # breaks in prefill
    near_limit = "hope " * 33  # breaks a few decode steps in
    handles = [engine.submit(p, a, params) for p, a in zip(PROMPTS, ADAPTERS * 2, strict=True)]
    breakers = [engine.submit(long_prompt, "a", params), engine.submit(near_limit, "b", params)]
    results = [h.result() for h in handles]
    assert [r.token_ids for r in results] == expected
    for broken in breakers:
        result = broken.result()
        assert result.finish_reason == "error" and "boom" in (result.error or "")
    assert 0 < len(breakers[1].result().token_ids) < 12


def test_a_row_whose_text_cannot_be_decoded_fails_alone(spm):
    # The batched detokenizing fails; the engine decodes row by row and fails only that row.
    engine = _engine(spm, max_batch_size=8)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = [_alone(engine, p, None, params).text for p in PROMPTS[:3]]
    texts = engine.detokenizer.texts
    bad = engine.submit("courage", None, params)

    def failing(seqs):
        if any(seq is bad.seq for seq in seqs):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")
        return texts(seqs)

    engine.detokenizer.texts = failing  # type: ignore[method-assign]
    handles = [engine.submit(p, None, params) for p in PROMPTS[:3]]
    assert [h.result().text for h in handles] == expected
    result = bad.result()
    assert result.finish_reason == "error" and "cannot decode the output" in (result.error or "")


def test_a_request_that_runs_out_of_memory_fails_alone_with_what_to_try(spm):
    engine = _engine(spm, max_batch_size=8)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = _alone(engine, PROMPTS[0], "a", params).token_ids
    forward = engine.runner.forward

    def tight(cache, rows, embeds, positions, new_valid, every=False):
        if embeds.shape[1] >= 30:  # a long prompt's prefill does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(cache, rows, embeds, positions, new_valid, every)

    engine.runner.forward = tight  # type: ignore[method-assign]
    ok = engine.submit(PROMPTS[0], "a", params)
    big = engine.submit("hope " * 40, "b", params)
    assert ok.result().token_ids == expected
    failed = big.result()
    assert failed.finish_reason == "error"
    assert (failed.error or "").startswith("out of memory on cpu for this request")
    assert engine.submit(PROMPTS[0], "a", params).result().token_ids == expected  # still serving


def test_background_thread_serves_requests_from_many_threads(spm):
    engine = _engine(spm, max_batch_size=4)
    params = SamplingParams(max_new_tokens=8, repetition_penalty=1.2)
    cases = [(p, a) for p in PROMPTS[:4] for a in ADAPTERS]
    expected = [_alone(engine, p, a, params).token_ids for p, a in cases]
    engine.start()
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = engine.submit(*cases[i], params).result().token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        engine.stop()
    assert [got[i] for i in range(len(cases))] == expected


@pytest.mark.parametrize("lean", [True, False])
def test_bfloat16_model_keys_and_values_in_the_forwards_dtype(tiny_model_dir, lean):
    """transformers' forward runs a bfloat16 model in bfloat16 (its cache too); the CPU's lean
    forward computes in float32 around its linear layers, so its cache is float32."""
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir), dtype=torch.bfloat16)
    engine = Engine(base.model, base.tokenizer, EngineConfig(lean_forward=lean, tune=False))
    engine.add_adapter("a", Adapter("a", torch.randn(3, 16) * 4))
    result = engine.generate(["be kind"], ["a"], SamplingParams(max_new_tokens=6, ignore_eos=True))[
        0
    ]
    assert len(result.token_ids) == 6
    assert engine.runner.packed == lean and (engine.runner.lean is not None) == lean
    dtype = torch.float32 if lean else torch.bfloat16
    assert engine.cache.keys[0].dtype == dtype
    assert engine.registry._resident["a"].prefix.keys[0].dtype == dtype


def test_generate_front_follows_the_adapters_loaded_in_the_model(spm):
    for name, rows in _raw(16).items():
        spm.add_adapter(Adapter(name, rows))
    params = SamplingParams(max_new_tokens=6)
    requests = [Request(p, a) for p in PROMPTS[:3] for a in ADAPTERS]
    first = generate(spm, requests, params)
    spm.remove_adapter("b")
    with pytest.raises(RequestError, match="unknown adapter 'b'"):
        generate(spm, requests, params)
    assert generate(spm, [r for r in requests if r.adapter != "b"], params) == [
        text for text, r in zip(first, requests, strict=True) if r.adapter != "b"
    ]


def test_an_adapter_replaced_under_the_same_name_is_served_as_replaced(spm, tiny_model_dir):
    rows = _raw(16)
    spm.add_adapter(Adapter("x", rows["a"]))
    params = SamplingParams(max_new_tokens=6)
    requests = [Request(p, "x") for p in PROMPTS[:3]]
    old = generate(spm, requests, params)
    spm.remove_adapter("x")
    spm.add_adapter(Adapter("x", rows["b"]))
    fresh = SoftPromptModel(load_base_model(str(tiny_model_dir)))
    fresh.add_adapter(Adapter("x", rows["b"]))
    want = generate(fresh, requests, params)
    assert want != old  # the two adapters answer differently
    assert generate(spm, requests, params) == want


def test_the_cache_gives_back_what_one_long_request_grew(spm):
    # A captured decode step attends over the cache's whole capacity: capacity kept after one
    # long request would make every later step slower for good (graphs=True runs that step
    # eagerly on the CPU).
    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_batch_size=2, graphs=True))
    initial = engine.cache.capacity
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    want = engine.generate(["be kind"], None, params)[0].token_ids
    short = engine.submit("be kind", None, SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()
    long = engine.submit(" ".join(["be"] * 150), None, params)
    while not long.seq.output_ids:  # its prompt in chunks, then into its slot
        engine.step()
    grown = engine.cache.capacity
    assert grown >= 4 * initial
    while not long.seq.finished:
        engine.step()
    # the long row has left, the short one still runs
    assert not short.seq.finished and engine.cache.capacity <= grown // 2
    assert short.result().finish_reason == "length"
    assert engine.cache.capacity == initial  # idle: back to where it started
    assert engine.generate(["be kind"], None, params)[0].token_ids == want


def test_length_groups_bound_the_padding_of_each_prefill():
    from softprompt.engine.scheduler import length_groups

    lengths = [30, 4, 29, 5, 28, 31, 6]
    groups = length_groups(lengths, lambda n: n, max_padding=0.19)
    assert groups == [[31, 30, 29, 28], [6, 5, 4]]  # 6 would make the first group 20% padding
    for group in groups:
        assert 1 - sum(group) / (max(group) * len(group)) <= 0.19
    assert length_groups(lengths, lambda n: n, 1.0) == [sorted(lengths, reverse=True)]
    assert length_groups(lengths, lambda n: n, 0.0) == [[n] for n in sorted(lengths)[::-1]]


def test_prefill_in_length_groups_gives_the_same_tokens(tiny_model_dir):
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    cases = [(p, a) for p in PROMPTS for a in ADAPTERS]
    params = SamplingParams(max_new_tokens=6)
    outputs, forwards = [], []
    for padding in (1.0, 0.0):
        config = EngineConfig(max_batch_size=len(cases), prefill_padding=padding)
        engine = Engine(base.model, base.tokenizer, config)
        for name, rows in _raw(16).items():
            engine.add_adapter(name, Adapter(name, rows))
        calls: list[int] = []

        def counted(prompts, prefixes, every=False, calls=calls, real=engine.runner.prefill):
            calls.append(len(prompts))
            return real(prompts, prefixes, every)

        engine.runner.prefill = counted
        done = engine.generate([p for p, _ in cases], [a for _, a in cases], params)
        outputs.append([c.token_ids for c in done])
        forwards.append(calls)
    assert outputs[0] == outputs[1]
    assert forwards[0] == [len(cases)]  # one group
    assert len(forwards[1]) == len({len(base.tokenizer(p)["input_ids"]) for p in PROMPTS})
