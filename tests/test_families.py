"""The lean forward on every decoder family it runs, against transformers' own forward.

Each family is a tiny random model made here (three layers, so windowed and global layers
alternate where the family does that), with random norm weights (so Gemma's ``1 + w`` and the
folding of norms into linear layers are exercised), small sliding windows that the prompts
outgrow, and small soft caps that bite. The reference is the untouched model's own ``generate``,
one row at a time, unpadded: the adapter's rows then the text's embeddings.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import _tiny_tokenizer
from softprompt.adapters import Adapter
from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.engine.families import describe
from softprompt.engine.runner import DecodeSwitches, ModelRunner

PROMPTS = [
    "i want you to act as a motivational coach",
    "be kind",
    "there are two nice things that should matter to me every day",
    "hope",
]
ADAPTERS = [None, "a", "b"]
WINDOW = 5
EXPECTED: dict[str, list[list[int]]] = {}
"""Each family's reference tokens, computed by the first test of the family that needs them."""
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


def tiny(family: str, vocab: int, **sizes: int):
    """A tiny random model of ``family`` (eval mode), norms randomised."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=sizes.get("hidden", 32),
        intermediate_size=sizes.get("intermediate", 64),
        num_hidden_layers=sizes.get("layers", 3),
        num_attention_heads=sizes.get("heads", 4),
        num_key_value_heads=sizes.get("kv_heads", 2),
        max_position_embeddings=256,
        initializer_range=0.3,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    window = sizes.get("window", WINDOW)
    if family == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(**common, sliding_window=window, head_dim=None)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=window, max_window_layers=1
        )
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tf.Qwen3Config(
            **common,
            head_dim=sizes.get("head_dim", 8),
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=window,
            max_window_layers=1,
        )
        cls = tf.Qwen3ForCausalLM
    elif family == "gemma2":
        config = tf.Gemma2Config(
            **common,
            head_dim=sizes.get("head_dim", 8),
            query_pre_attn_scalar=6,
            sliding_window=window,
            attn_logit_softcapping=sizes.get("attn_softcap", 3.0),
            final_logit_softcapping=sizes.get("final_softcap", 6.0),
            layer_types=["sliding_attention", "full_attention", "sliding_attention"][
                : common["num_hidden_layers"]
            ]
            if common["num_hidden_layers"] <= 3
            else None,
        )
        cls = tf.Gemma2ForCausalLM
    elif family == "gemma3_text":
        config = tf.Gemma3TextConfig(
            **common,
            head_dim=sizes.get("head_dim", 8),
            query_pre_attn_scalar=6,
            sliding_window=window,
            sliding_window_pattern=2,
        )
        cls = tf.Gemma3ForCausalLM
    elif family == "phi3":
        config = tf.Phi3Config(
            **common, sliding_window=window, partial_rotary_factor=sizes.get("rotary", 0.5)
        )
        cls = tf.Phi3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + 0.5)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer()


def _rows(hidden: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        "a": torch.randn(3, hidden, generator=generator),
        "b": torch.randn(5, hidden, generator=generator),
    }


def _reference(model, rows: torch.Tensor | None, ids: list[int], new: int) -> list[int]:
    """Greedy tokens of the untouched model's own ``generate``, one unpadded row."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor(ids))
        if rows is not None:
            embeds = torch.cat((rows, embeds))
        out = model.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=1,
        )[0].tolist()
    return out[: out.index(1)] if 1 in out else out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_lean_forward(tokenizer, family):
    model = tiny(family, len(tokenizer))
    described, why = describe(model)
    assert described is not None, why
    runner = ModelRunner(model, DecodeSwitches(packed_weights=True, tune=False))
    assert runner.lean is not None


@pytest.mark.parametrize("path", ["transformers", "fused", "torch-decode", "fixed-shape"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_on_a_mixed_batch(tokenizer, family, path):
    if path == "fused" and not shutil.which("cc"):
        pytest.skip("the fused kernels need a C compiler")
    model = tiny(family, len(tokenizer))
    cases = [(p, a) for p in PROMPTS for a in ADAPTERS]
    config = EngineConfig(
        max_batch_size=len(cases) + (2 if path == "fixed-shape" else 0),
        packed_weights=path != "transformers",
        graphs=path == "fixed-shape",
        cpu_kernels={"fused": True, "torch-decode": False}.get(path),
        full_batch_pack=False,
        tune=False,
    )
    engine = Engine(model, tokenizer, config)
    lean = engine.runner.lean
    assert (lean is not None) == (path != "transformers")
    if path == "fused":
        assert lean is not None and lean.kernels is not None
    rows = _rows(model.config.hidden_size)
    for name, weights in rows.items():
        engine.add_adapter(name, Adapter(name, weights))
    new = 8
    params = SamplingParams(max_new_tokens=new)
    ids = [tokenizer(p)["input_ids"] for p, _ in cases]
    ours = engine.generate(ids, [a for _, a in cases], params)
    if family not in EXPECTED:  # the reference does not depend on the path: once per family
        untouched = tiny(family, len(tokenizer))
        EXPECTED[family] = [
            _reference(untouched, rows.get(a or ""), i, new)
            for i, (_, a) in zip(ids, cases, strict=True)
        ]
    reference = EXPECTED[family]
    assert [c.token_ids for c in ours] == reference
    assert len({tuple(r) for r in reference}) > 4  # adapters and prompts change the outputs
    # The longest rows outgrow the window: the windowed layers are exercised.
    assert max(len(i) for i in ids) + 5 + new > 2 * WINDOW


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_equal_transformers(tokenizer, family):
    model = tiny(family, len(tokenizer))
    runner = ModelRunner(model, DecodeSwitches(packed_weights=True, tune=False))
    assert runner.lean is not None
    ids = tokenizer(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    cache, logits = runner.prefill([ids[:-1]], [None], every=True)
    torch.testing.assert_close(logits[0], expected[:-1], rtol=1e-4, atol=1e-4)
    # One decode step after it, on the decode path the runner chose.
    cache.rows = slice(0, 1)
    step = runner.decode(
        _grown(runner, cache), slice(0, 1), torch.tensor([ids[-1]]), torch.tensor([len(ids) - 1])
    )
    torch.testing.assert_close(step[0], expected[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_linears_stay_close_to_transformers_in_float32(tokenizer, family):
    """Every family on the bfloat16 path (linear layers and KV cache in bfloat16, activations
    passed between the fused kernels in bfloat16, the residual stream in float32): prefill and
    a fused decode step near float32's logits (random weights and norms of these tiny models
    amplify rounding more than a trained model's)."""
    from softprompt.engine.packed import can_pack

    if not can_pack(torch.nn.Linear(4, 4), torch.bfloat16):
        pytest.skip("this PyTorch's oneDNN does not multiply in bfloat16")
    model = tiny(family, len(tokenizer))
    switches = DecodeSwitches(packed_weights=True, tune=False, linear_dtype="bfloat16")
    runner = ModelRunner(model, switches)
    assert runner.cache_dtype == torch.bfloat16
    ids = tokenizer(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    cache, logits = runner.prefill([ids[:-1]], [None], every=True)
    cache.rows = slice(0, 1)
    step = runner.decode(
        _grown(runner, cache), slice(0, 1), torch.tensor([ids[-1]]), torch.tensor([len(ids) - 1])
    )
    spread = expected.std().item()
    # Measured (torch 2.13, these random models): at most 0.11 and 0.017 of the spread.
    for got, want in ((logits[0], expected[:-1]), (step[0], expected[-1])):
        assert (got - want).abs().max().item() < 0.25 * spread
        assert (got - want).abs().mean().item() < 0.03 * spread


def _grown(runner: ModelRunner, cache):
    """``cache`` with a free column after its end for one decode step."""
    cache.reserve(1, 1)
    return cache


def test_a_family_the_lean_forward_does_not_know_falls_back_with_a_reason(tokenizer, caplog):
    model = tiny("llama", len(tokenizer))
    model.config.hidden_act = "gelu"
    described, why = describe(model)
    assert described is None and "activation" in why
    with caplog.at_level("INFO", logger="softprompt.engine.runner"):
        runner = ModelRunner(model, DecodeSwitches(packed_weights=True, tune=False))
    assert runner.lean is None
    assert any("not the lean one" in r.message and "gelu" in r.message for r in caplog.records)
