"""The CPU decode path picked by measuring: the choice on injected timings, the cache, and the
switches that force a path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from softprompt.engine import Engine, EngineConfig
from softprompt.engine.autotune import CACHE_FILE, DecodePath, cache_key, decide, pick

MKL_FUSED, MKL_PLAIN = DecodePath(True, True), DecodePath(True, False)
ONEDNN_FUSED, ONEDNN_PLAIN = DecodePath(False, True), DecodePath(False, False)
PANELS = DecodePath(False, True, panel_linear=True)


def test_the_fastest_path_wins_and_a_near_tie_goes_to_fewer_extras():
    assert pick({MKL_FUSED: 10.0, ONEDNN_FUSED: 20.0, ONEDNN_PLAIN: 30.0}) == MKL_FUSED
    assert pick({MKL_FUSED: 20.0, ONEDNN_FUSED: 10.0, ONEDNN_PLAIN: 30.0}) == ONEDNN_FUSED
    # within 2%: oneDNN (no second copy of the weights) over MKL, the kernels over none
    assert pick({MKL_FUSED: 10.0, ONEDNN_FUSED: 10.1}) == ONEDNN_FUSED
    assert pick({ONEDNN_PLAIN: 10.0, ONEDNN_FUSED: 10.15}) == ONEDNN_FUSED
    assert pick({ONEDNN_PLAIN: 10.0, ONEDNN_FUSED: 12.0}) == ONEDNN_PLAIN
    # the panel linears: when faster, and not in a tie with oneDNN
    assert pick({ONEDNN_FUSED: 10.0, PANELS: 8.0, MKL_FUSED: 12.0}) == PANELS
    assert pick({ONEDNN_FUSED: 10.0, PANELS: 9.9}) == ONEDNN_FUSED


def test_a_decision_is_measured_once_then_read_from_the_cache(tmp_path):
    calls = []

    def measure(path: DecodePath) -> float:
        calls.append(path)
        return {MKL_FUSED: 9.0, ONEDNN_FUSED: 5.0}[path]

    first = decide([MKL_FUSED, ONEDNN_FUSED], measure, "k1", tmp_path)
    assert first.picked == ONEDNN_FUSED and first.measured and len(calls) == 4  # 2 rounds
    assert first.timings == {MKL_FUSED.label(): 9.0, ONEDNN_FUSED.label(): 5.0}
    again = decide([MKL_FUSED, ONEDNN_FUSED], measure, "k1", tmp_path)
    assert again.picked == ONEDNN_FUSED and not again.measured and len(calls) == 4
    other = decide([MKL_FUSED, ONEDNN_FUSED], measure, "k2", tmp_path)  # another machine
    assert other.measured and len(calls) == 8
    assert set(json.loads((tmp_path / CACHE_FILE).read_text())) == {"k1", "k2"}
    # A damaged cache file costs a measurement, never a crash.
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert decide([MKL_FUSED, ONEDNN_FUSED], measure, "k1", tmp_path).measured
    # One candidate (a forced path) is never measured.
    assert not decide([MKL_PLAIN], measure, "k3", tmp_path).measured and len(calls) == 12


def test_retune_measures_again_and_replaces_the_cached_decision(tmp_path, monkeypatch):
    # A decision cached while the machine was busy: MKL measured faster then.
    busy = {MKL_FUSED: 5.0, ONEDNN_FUSED: 9.0}
    assert decide([MKL_FUSED, ONEDNN_FUSED], busy.get, "k", tmp_path).picked == MKL_FUSED
    quiet = {MKL_FUSED: 9.0, ONEDNN_FUSED: 5.0}
    assert decide([MKL_FUSED, ONEDNN_FUSED], quiet.get, "k", tmp_path).picked == MKL_FUSED
    fresh = decide([MKL_FUSED, ONEDNN_FUSED], quiet.get, "k", tmp_path, retune=True)
    assert fresh.measured and fresh.picked == ONEDNN_FUSED
    assert decide([MKL_FUSED, ONEDNN_FUSED], busy.get, "k", tmp_path).picked == ONEDNN_FUSED


def test_the_key_names_what_the_decision_depends_on(monkeypatch):
    key = cache_key((30, 576), 32)
    assert key != cache_key((30, 576), 64) and key != cache_key((24, 576), 32)
    # a decision among fewer paths does not stand for one with a new candidate
    among = cache_key((30, 576), 32, [ONEDNN_FUSED, MKL_FUSED])
    assert among != cache_key((30, 576), 32, [ONEDNN_FUSED, MKL_FUSED, PANELS])
    assert among == cache_key((30, 576), 32, [MKL_FUSED, ONEDNN_FUSED])
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key != cache_key((30, 576), 32)


@pytest.mark.parametrize("fastest", [MKL_FUSED, ONEDNN_PLAIN, PANELS])
def test_the_engine_runs_the_path_measured_fastest(tiny_model_dir, tmp_path, monkeypatch, fastest):
    from softprompt.engine.runner import ModelRunner
    from softprompt.models import load_base_model

    if not shutil.which("cc"):
        pytest.skip("the fused kernels need a C compiler")
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    monkeypatch.delenv("SOFTPROMPT_CPU_KERNELS", raising=False)
    monkeypatch.delenv("SOFTPROMPT_FULL_BATCH_PACK", raising=False)
    timed: list[DecodePath] = []

    def fake_time(self, batch: int, context: int = 48) -> float:
        lean = self.lean
        head = lean.lm_head
        on_panels = head._panel_kernels is not None
        path = DecodePath(head.full_batch is not None, lean.kernels is not None, on_panels)
        timed.append(path)
        return 1.0 if path == fastest else 2.0

    monkeypatch.setattr(ModelRunner, "_time_decode", fake_time)
    base = load_base_model(str(tiny_model_dir))
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=4))
    # every combination, in turn, twice
    assert timed == [MKL_FUSED, MKL_PLAIN, ONEDNN_FUSED, ONEDNN_PLAIN, PANELS] * 2
    decision = engine.runner.decode_path
    assert decision is not None and decision.picked == fastest and decision.measured
    lean = engine.runner.lean
    assert (lean.kernels is not None) == fastest.cpu_kernels
    assert all((p.full_batch == 4) == fastest.full_batch_pack for p in lean.packed_linears())
    if not fastest.full_batch_pack:
        assert all(p.batch_packed is None for p in lean.packed_linears())  # MKL's copy freed
    # Only the copy of the weights the chosen path reads is kept.
    for linear in lean.packed_linears():
        assert (linear.panels is not None) == fastest.panel_linear
        assert (linear.packed is None) == fastest.panel_linear
    # The next engine on this machine reads the decision instead of measuring, and packs
    # oneDNN's copy of a weight only when the path kept reads it.
    from softprompt.engine import packed

    onednn_packs: list[tuple[int, ...]] = []
    pack = packed._onednn_pack
    monkeypatch.setattr(
        packed,
        "_onednn_pack",
        lambda w, dtype=torch.float32: onednn_packs.append(tuple(w.shape)) or pack(w, dtype),
    )
    timed.clear()
    second = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=4))
    assert timed == [] and second.runner.decode_path.picked == fastest
    shapes = [(p.out_features, p.in_features) for p in second.runner.lean.packed_linears()]
    engine_packs = [s for s in onednn_packs if s != (4, 8)]  # (4, 8): can_pack's probe
    assert engine_packs == ([] if fastest.panel_linear else shapes)
    assert not second.runner.decode_path.measured
    # Asked to, it measures again (the config's switch or the environment's).
    config = EngineConfig(max_batch_size=4, retune=True)
    assert Engine(base.model, base.tokenizer, config).runner.decode_path.measured
    monkeypatch.setenv("SOFTPROMPT_RETUNE", "1")
    assert Engine(
        base.model, base.tokenizer, EngineConfig(max_batch_size=4)
    ).runner.decode_path.measured
    monkeypatch.delenv("SOFTPROMPT_RETUNE")
    assert len(timed) == 20
    timed.clear()
    # Forcing both switches measures nothing.
    monkeypatch.setenv("SOFTPROMPT_FULL_BATCH_PACK", "1")
    forced = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=8, cpu_kernels=False))
    assert timed == [] and forced.runner.decode_path.picked == MKL_PLAIN
    assert forced.runner.lean.kernels is None
    monkeypatch.delenv("SOFTPROMPT_FULL_BATCH_PACK")
    monkeypatch.setenv("SOFTPROMPT_PANEL_LINEAR", "1")
    on_panels = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=8))
    assert timed == [] and on_panels.runner.decode_path.picked == PANELS
    assert all(p.packed is None for p in on_panels.runner.lean.packed_linears())
    monkeypatch.setenv("SOFTPROMPT_PANEL_LINEAR", "0")
    Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=16))  # a new key: measured
    assert PANELS not in timed and len(timed) == 8
