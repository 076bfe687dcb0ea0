"""The engine under requests that could hurt other users: bad seeds, sampling that fails, a full
queue, adapters removed under queued requests, long stop strings, a drain, a dying step loop."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt.adapters import Adapter, adapter_config, write_adapter_files
from softprompt.engine import Engine, EngineConfig, RequestError, SamplingParams
from softprompt.engine.engine import QueueFull, ShuttingDown
from softprompt.engine.stops import StopMatcher


def _engine(spm, **config) -> Engine:
    engine = Engine(spm.model, spm.tokenizer, EngineConfig(**config))
    rows = torch.randn(3, spm.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    engine.add_adapter("a", Adapter("a", rows))
    return engine


def test_a_seed_outside_64_bits_is_refused_at_submission(spm):
    for seed in (2**64, 2**63, -(2**63) - 1):
        with pytest.raises(RequestError) as caught:
            SamplingParams(temperature=1.0, seed=seed)
        assert caught.value.field == "seed"
    for seed in (2**63 - 1, -(2**63), 0):
        SamplingParams(temperature=1.0, seed=seed)  # the whole signed range is fine


def test_a_row_whose_sampling_fails_fails_alone(spm):
    """NaN logits in one sampled row: that request ends with an error, the others run on."""
    engine = _engine(spm, max_batch_size=4)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    expected = engine.generate(["be kind"], ["a"], params)[0].token_ids
    decode = engine.runner.decode
    poisoned: list[str] = []

    def nan_for_the_poisoned_row(cache, rows, tokens, positions):
        logits = decode(cache, rows, tokens, positions)
        for i, seq in enumerate(engine.scheduler.running[rows]):
            if seq.request_id in poisoned:
                logits[i] = float("nan")
        return logits

    engine.runner.decode = nan_for_the_poisoned_row  # type: ignore[method-assign]
    good = engine.submit("be kind", "a", params)
    bad = engine.submit("hope", None, params)
    poisoned.append(bad.request_id)
    other = engine.submit("hope", None, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert good.result().token_ids == expected
    assert len(other.result().token_ids) == 10
    failed = bad.result()
    assert failed.finish_reason == "error" and "not finite" in (failed.error or "")
    assert len(failed.token_ids) == 1  # its first token came from prefill, before the NaNs


def test_the_queue_is_bounded_and_refuses_all_or_nothing(spm):
    engine = _engine(spm, max_batch_size=2, max_queue=3)
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(RequestError, match="queue of 3") as caught:
        engine.submit_many([("hope", None, params, None)] * 4)
    assert caught.value.field == "n" and not isinstance(caught.value, QueueFull)
    held = engine.submit_many([("hope", None, params, None)] * 3)
    with pytest.raises(QueueFull, match="3 of 3"):
        engine.submit("be kind", "a", params)
    assert engine.load()["waiting"] == 3  # the refused request left nothing behind
    assert all(len(h.result().token_ids) >= 1 for h in held)
    engine.submit("be kind", "a", params).result()  # room again once they ran


def test_removing_an_adapter_lets_its_queued_requests_finish(spm, tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    rows = torch.randn(4, spm.hidden_size, generator=torch.Generator().manual_seed(5)) * 4
    write_adapter_files(folder, rows, adapter_config(Adapter("gone", rows), "tiny"))
    engine = _engine(spm, max_batch_size=1)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = engine.generate(["be kind"], ["a"], params)[0].token_ids
    engine.add_adapter("gone", folder)
    alone = engine.generate(["hope"], ["gone"], params)[0].token_ids
    engine.registry._resident.clear()  # not resident: the queued request must keep its rows
    running = engine.submit("be kind", "a", params)
    engine.step()
    queued = engine.submit("hope", "gone", params)
    engine.remove_adapter("gone")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    assert running.result().token_ids == expected
    result = queued.result()
    assert result.finish_reason == "length" and result.token_ids == alone
    assert engine.registry._entries.keys() == {"a"}


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text("ab\ufffd", min_size=1, max_size=5), min_size=1, max_size=3),
    pieces=st.lists(st.text("abc", max_size=4), max_size=12),
)
def test_stop_matcher_finds_what_find_finds_and_holds_possible_starts(stops, pieces):
    matcher = StopMatcher(stops)
    text = ""
    for piece in pieces:
        text += piece
        cut, hold = matcher.feed(text, len(text))
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        if hits:
            assert cut == min(hits)
            return
        assert cut is None
        expected = max(
            (n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )
        assert hold == expected


def test_stop_matcher_reads_each_character_once():
    """Four 256-character stops against a 20,000-character completion, a character a token:
    the characters read stay linear in the text (the old check was quadratic in stop length)."""
    stops = ["ab" * 127 + "c" + "d", "a" * 255 + "x", "b" * 256, "ba" * 128]
    matcher = StopMatcher(stops)
    read = 0
    run = matcher._run

    def counting(states, text, start, end):
        nonlocal read
        read += max(0, end - start)
        return run(states, text, start, end)

    matcher._run = counting  # type: ignore[method-assign]
    text = ""
    rng = random.Random(0)
    for _ in range(20_000):
        text += rng.choice("ab")
        cut, _ = matcher.feed(text, len(text))
        assert cut is None
    assert read <= 2 * len(text)


def test_stop_strings_longer_than_the_cap_are_refused():
    SamplingParams(stop=["x" * 256])
    with pytest.raises(RequestError, match="256 characters") as caught:
        SamplingParams(stop=["x" * 257])
    assert caught.value.field == "stop"


def test_a_drain_finishes_running_requests_then_aborts_the_rest(spm):
    engine = _engine(spm, max_batch_size=2)
    engine.start()
    try:
        short = engine.submit("hope", None, SamplingParams(max_new_tokens=5, ignore_eos=True))
        short.result()
        decode = engine.runner.decode

        def slow(*args, **kwargs):
            time.sleep(0.01)
            return decode(*args, **kwargs)

        engine.runner.decode = slow  # type: ignore[method-assign]
        long = engine.submit("hope", "a", SamplingParams(max_new_tokens=200, ignore_eos=True))
        while not long.seq.output_ids:
            time.sleep(0.01)
        engine.drain(0.3)
        with pytest.raises(ShuttingDown):
            engine.submit("hope")
        result = long.result()
        assert result.finish_reason == "abort" and 0 < len(result.token_ids) < 200
        deadline = time.monotonic() + 5
        while engine.background:  # the loop ends by itself once everything has ended
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.failure is None
    finally:
        engine.stop()


def test_a_step_loop_that_dies_says_so_and_ends_every_request(spm):
    engine = _engine(spm, max_batch_size=2)
    has_work = engine.has_work
    calls = 0

    def dies_on_the_third_look() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise MemoryError("no memory left")
        return has_work()

    engine.has_work = dies_on_the_third_look  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    handles = [engine.submit("hope", None, params) for _ in range(3)]
    with pytest.raises(MemoryError):
        engine.run()
    assert engine.failure is not None and "MemoryError" in engine.failure
    for handle in handles:
        result = handle.result()
        assert result.finish_reason == "error" and "stopped" in (result.error or "")
    with pytest.raises(ShuttingDown):
        engine.submit("hope")


def _adapter_folder(folder, rows: int, hidden: int, seed: int = 5):
    folder.mkdir(exist_ok=True)
    weights = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))
    write_adapter_files(folder, weights, adapter_config(Adapter(folder.name, weights), "tiny"))
    return folder


def test_reading_an_adapter_file_holds_no_lock(spm, tmp_path, monkeypatch):
    # A slow disk (or a large adapter) read for one request must not stall the registry for
    # every other request and for the engine's own prepare/release.
    import threading

    from softprompt.engine import registry as registry_module

    engine = _engine(spm)
    engine.add_adapter("slow", _adapter_folder(tmp_path / "slow", 4, spm.hidden_size))
    reading, finish = threading.Event(), threading.Event()
    real = registry_module.load_adapter

    def slow_load(*args, **kwargs):
        reading.set()
        finish.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry_module, "load_adapter", slow_load)
    claimed: list = []
    claimer = threading.Thread(target=lambda: claimed.append(engine.registry.claim("slow")))
    claimer.start()
    try:
        assert reading.wait(10)
        answered: list = []
        other = threading.Thread(
            target=lambda: answered.append(
                (engine.registry.length("a"), engine.registry.names(), engine.registry.nbytes())
            )
        )
        other.start()
        other.join(2)
        assert answered, "the registry was held while one adapter's file was read"
        lease = engine.registry.claim("a")  # an adapter in memory: claimed at once
        engine.registry.release(lease)
    finally:
        finish.set()
        claimer.join(10)
    assert claimed and claimed[0].adapter is not None
    engine.registry.release(claimed[0])


def test_the_context_check_uses_the_adapter_that_runs(spm, tmp_path):
    # The registry recorded 4 virtual tokens when the folder was added; the folder now holds
    # 200, and that is what a request would run with.
    engine = _engine(spm)
    folder = _adapter_folder(tmp_path / "grows", 4, spm.hidden_size)
    engine.add_adapter("grows", folder)
    _adapter_folder(folder, 200, spm.hidden_size)
    prompt = " ".join(["be"] * 100)
    with pytest.raises(RequestError, match="context"):
        engine.submit(prompt, "grows", SamplingParams(max_new_tokens=2))
    assert engine.load() == {"running": 0, "waiting": 0}
    assert engine.registry._entries["grows"].pins == 0


def test_a_vanished_adapter_folder_is_never_fetched_from_the_hub(spm, tmp_path, monkeypatch):
    # A name found in a local folder ("adapters/foo", relative, as `serve --adapters adapters`
    # gives it) whose folder is deleted must not become a Hub repository id.
    import shutil

    from softprompt import hub

    fetched: list = []
    monkeypatch.setattr(hub, "download_adapter", lambda *a, **k: fetched.append(a) or "")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    folder = _adapter_folder(tmp_path / "adapters" / "foo", 4, spm.hidden_size)
    engine = _engine(spm)
    engine.add_adapter("foo", Path("adapters") / "foo")
    shutil.rmtree(folder)
    with pytest.raises(RequestError, match="foo"):
        engine.submit("be kind", "foo", SamplingParams(max_new_tokens=2))
    assert fetched == []
    assert engine.load() == {"running": 0, "waiting": 0}
