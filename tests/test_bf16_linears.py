"""Linear layers multiplied in bfloat16 on the CPU's lean forward: what a layer computes, how
the engine chooses it (measured beside float32, or forced), and a bfloat16 model served on
the float32 path around its linears."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F

from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.engine.autotune import DecodePath
from softprompt.engine.packed import PackedLinear, can_pack
from softprompt.engine.runner import ModelRunner
from softprompt.models import load_base_model

needs_bf16 = pytest.mark.skipif(
    not can_pack(torch.nn.Linear(4, 4), torch.bfloat16),
    reason="this PyTorch's oneDNN does not multiply in bfloat16",
)


@needs_bf16
def test_a_bfloat16_layer_multiplies_rounded_operands_and_answers_in_float32():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(5, 64, generator=g)
    layer = PackedLinear(weight, bias, dtype=torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    # The product of the operands (and bias) rounded to bfloat16, accumulated in float32;
    # oneDNN hands the result back in bfloat16 (8 bits of mantissa), widened to float32.
    rounded = F.linear(x.bfloat16().float(), weight.bfloat16().float(), bias.bfloat16().float())
    assert torch.allclose(got, rounded, rtol=2**-8, atol=1e-3)
    narrow = layer.narrow(x)  # what the fused decode step passes on: no conversion after
    assert narrow.dtype == torch.bfloat16 and torch.equal(narrow.float(), got)
    exact = F.linear(x, weight, bias)
    assert not torch.equal(got, exact)  # it is not float32's product
    # Switching dtype repacks: float32 is float32's product again.
    layer.use_dtype(torch.float32)
    assert torch.allclose(layer(x), exact, atol=1e-4)
    assert layer.packed is not None and layer.packed.dtype == torch.float32


def _greedy(engine: Engine, prompts: list[list[int]], tokens: int = 8) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, None, params)]


def _reference(model, prompts: list[list[int]], tokens: int = 8) -> list[list[int]]:
    out = []
    for ids in prompts:
        given = torch.tensor([ids])
        generated = model.generate(
            given,
            attention_mask=torch.ones_like(given),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
        )
        out.append(generated[0, len(ids) :].tolist())
    return out


PROMPTS = [[5, 9, 14, 3], [7, 7, 2, 11, 19, 4, 6], [12]]


def test_a_bfloat16_model_runs_the_lean_forward_in_float32_around_its_weights(tiny_model_dir):
    """On float32 copies of its linears (the unmeasured choice), a bfloat16 model's engine
    computes exactly what the same weights compute in float32: the greedy tokens of the model
    cast to float32, not transformers' bfloat16 forward (which runs every operation in
    bfloat16, and on the CPU through slow conversions)."""
    base = load_base_model(str(tiny_model_dir), dtype=torch.bfloat16)
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=4, tune=False))
    runner = engine.runner
    assert runner.lean is not None and runner.packed and runner.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in runner.lean.packed_linears())
    widened = load_base_model(str(tiny_model_dir), dtype=torch.bfloat16).model.float()
    assert _greedy(engine, PROMPTS) == _reference(widened, PROMPTS)
    assert base.model.dtype == torch.bfloat16  # the caller's model is left as it was


@needs_bf16
def test_bfloat16_linears_when_asked_for_stay_close_to_float32(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir))
    exact = ModelRunner(base.model, EngineConfig(tune=False).switches(), max_batch=4)
    config = EngineConfig(cpu_linear_dtype="bfloat16", tune=False)
    halved = ModelRunner(base.model, config.switches(), max_batch=4)
    assert halved.decode_path is not None and halved.decode_path.picked.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in halved.lean.packed_linears())
    # activations stay float32 around the linears; the KV cache is bfloat16
    assert halved.dtype == torch.float32 and halved.cache_dtype == torch.bfloat16
    ids = [list(range(3, 3 + n)) for n in (4, 9)]
    _, want = exact.prefill(ids, [None, None], every=True)
    _, got = halved.prefill(ids, [None, None], every=True)
    _close_but_not_equal(got, want)
    # A decode step on the fused kernels over a bfloat16 cache (when they build).
    stepped = []
    for runner in (exact, halved):
        cache = runner.staging(None, 12)
        runner.extend(cache, ids[1][:-1], 0)
        token, position = torch.tensor([ids[1][-1]]), torch.tensor([len(ids[1]) - 1])
        stepped.append(runner.decode(cache, slice(0, 1), token, position))
        assert cache.keys[0].dtype == runner.cache_dtype
    _close_but_not_equal(stepped[1], stepped[0])
    assert torch.allclose(stepped[0], want[1, -1:], atol=1e-4)  # float32 decode = prefill
    assert base.model.dtype == torch.float32


def _close_but_not_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16 products (8 bits of mantissa per operand, two layers of them): within a tenth
    of the logits' spread everywhere, a hundredth on average, and not float32's numbers."""
    spread = want.std().item()
    assert not torch.equal(got, want)
    assert (got - want).abs().max().item() < 0.1 * spread
    assert (got - want).abs().mean().item() < 0.01 * spread


class _Timer:
    """A stand-in for ``ModelRunner._time_decode``: the path each call runs, and a time that
    makes ``fastest`` win."""

    def __init__(self, fastest: DecodePath) -> None:
        self.fastest = fastest
        self.timed: list[DecodePath] = []

    def __call__(self, runner: ModelRunner) -> float:
        lean = runner.lean
        head = lean.lm_head
        path = DecodePath(
            head.full_batch is not None,
            lean.kernels is not None,
            head._panel_kernels is not None,
            bfloat16=head.dtype == torch.bfloat16,
        )
        self.timed.append(path)
        return 1.0 if path == self.fastest else 2.0


@needs_bf16
@pytest.mark.parametrize("native", [True, False])
def test_auto_measures_bfloat16_beside_float32_where_the_cpu_has_it(
    tiny_model_dir, tmp_path, monkeypatch, native
):
    if not shutil.which("cc"):
        pytest.skip("the fused kernels need a C compiler")
    from softprompt.engine import runner as runner_module

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    for name in ("SOFTPROMPT_CPU_KERNELS", "SOFTPROMPT_FULL_BATCH_PACK", "SOFTPROMPT_PANEL_LINEAR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runner_module, "native_cpu_bf16", lambda: native)
    halves = DecodePath(False, True, bfloat16=True)
    timer = _Timer(halves)
    monkeypatch.setattr(ModelRunner, "_time_decode", lambda self, batch, context=48: timer(self))
    base = load_base_model(str(tiny_model_dir))
    config = EngineConfig(max_batch_size=4, cpu_linear_dtype="auto")
    engine = Engine(base.model, base.tokenizer, config)
    picked = engine.runner.decode_path.picked
    if native:
        assert halves in timer.timed and DecodePath(False, False, bfloat16=True) in timer.timed
        assert picked == halves
        assert all(p.dtype == torch.bfloat16 for p in engine.runner.lean.packed_linears())
        summary = engine.runner.decode_path.summary()
        assert "oneDNN bfloat16 with a bfloat16 KV cache, fused C kernels" in summary
        assert engine.cache.keys[0].dtype == torch.bfloat16
    else:  # no bfloat16 instructions: never a candidate, so never slower than float32
        assert not any(p.bfloat16 for p in timer.timed) and not picked.bfloat16
    # float32 (the default for a float32 model) never measures bfloat16.
    timer.timed.clear()
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "other"))
    Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=4))
    assert timer.timed and not any(p.bfloat16 for p in timer.timed)


def test_an_unknown_linear_dtype_is_refused():
    with pytest.raises(ValueError, match="cpu_linear_dtype"):
        EngineConfig(cpu_linear_dtype="float16")
