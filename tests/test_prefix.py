"""Deep prompts (prefix tuning): PEFT's PREFIX_TUNING files both ways with equal losses, starts
from the model's own keys/values, batches mixing prefix, prompt and no adapter."""

from __future__ import annotations

import pytest
import torch

from softprompt.adapters import Adapter, load_adapter, write_adapter_files
from softprompt.errors import UserError
from softprompt.insight.evaluate import evaluate
from softprompt.models import load_base_model
from softprompt.prefix import PrefixShape, join, model_kv, peft_config, split
from softprompt.rows import batch_loss, training_rows
from softprompt.tuning.init import init_prefix, init_prompt
from test_peft_parity import TEXTS, peft_loss

peft = pytest.importorskip("peft")


def prefix_adapter(spm, name: str, weights: torch.Tensor) -> Adapter:
    shape = PrefixShape.of(spm.model)
    return Adapter(name, weights, peft_config(weights.shape[0], shape, spm.base.name))


def test_the_tiny_models_prefix_shape_is_its_key_value_cache(spm):
    shape = PrefixShape.of(spm.model)
    # 2 layers, 2 attention heads but 1 key/value head (GQA), hidden 16: head size 8.
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (2, 1, 8)
    assert shape.width == 2 * 2 * 1 * 8
    weights = torch.randn(3, shape.width)
    keys, values = split(weights, shape)
    assert keys.shape == values.shape == (2, 1, 3, 8)
    assert torch.equal(join(keys, values), weights)


def test_a_vocab_start_is_the_models_own_keys_and_values(spm):
    start = init_prefix(spm.base, 4, "vocab", seed=3)
    rows = init_prompt(spm.base, 4, "vocab", seed=3)
    keys, values = model_kv(spm.model, rows)
    assert torch.equal(split(start, spm.prefix_shape)[0], keys)
    # A prefix of the model's own keys/values for tokens = those tokens as a soft prompt: the
    # text after it scores the same (the first text token aside, which a prefix cannot predict).
    spm.add_adapter(prefix_adapter(spm, "deep", start))
    spm.add_adapter(Adapter("shallow", rows))
    deep = evaluate(spm, TEXTS, "deep").loss
    shallow = evaluate(spm, TEXTS, "shallow").loss
    assert deep == pytest.approx(shallow, rel=1e-5)
    random = init_prefix(spm.base, 4, "random", seed=3)
    ratio = split(random, spm.prefix_shape)[1].std() / values.std()
    assert 0.5 < float(ratio) < 2  # scale-matched, not N(0, 1)


def test_peft_loads_our_prefix_adapter_with_the_same_loss(spm, tiny_model_dir, tmp_path):
    weights = init_prefix(spm.base, 5, "text", text="be kind")
    adapter = prefix_adapter(spm, "ours", weights)
    (tmp_path / "ours").mkdir()
    write_adapter_files(tmp_path / "ours", weights, adapter.config)
    spm.add_adapter(load_adapter(tmp_path / "ours"))
    ours = evaluate(spm, TEXTS, "ours").loss

    base = load_base_model(str(tiny_model_dir)).model
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    assert peft_loss(peft_model, spm, TEXTS) == pytest.approx(ours, rel=1e-5)


def test_we_load_peft_prefix_adapters_with_the_same_loss(spm, tiny_model_dir, tmp_path):
    base = load_base_model(str(tiny_model_dir)).model
    torch.manual_seed(0)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():  # N(0, 1) noise swamps a tiny model's attention; keep it readable
        peft_model.prompt_encoder["default"].embedding.weight.mul_(0.3)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    reference = peft_loss(peft_model, spm, TEXTS)

    adapter = load_adapter(tmp_path / "theirs")
    assert adapter.method == "prefix" and adapter.num_virtual_tokens == 6
    spm.add_adapter(adapter)
    assert evaluate(spm, TEXTS, "theirs").loss == pytest.approx(reference, rel=1e-5)


def test_a_batch_mixing_prefix_prompt_and_base_rows_scores_each_as_alone(spm):
    spm.add_adapter(prefix_adapter(spm, "deep", init_prefix(spm.base, 3, "vocab", seed=1)))
    spm.add_adapter(prefix_adapter(spm, "deeper", init_prefix(spm.base, 7, "vocab", seed=2)))
    spm.add_adapter(Adapter("shallow", init_prompt(spm.base, 4, "vocab", seed=4)))
    rows = []
    for i, text in enumerate(TEXTS * 2):
        name = ["deep", "deeper", "shallow", None][i % 4]
        rows += training_rows(spm, [text], name, 32)[0]
    mixed, _ = batch_loss(spm, rows, skip_first=True, per_row=True)
    alone = torch.stack([batch_loss(spm, [row], skip_first=True)[0] for row in rows])
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


def test_a_model_whose_layers_mix_attention_kinds_is_refused(spm):
    spm.model.config.layer_types = ["full_attention", "sliding_attention"]
    assert PrefixShape.of(spm.model).layers == 2  # windows keep the same keys and values
    spm.model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UserError, match="another attention kind"):
        PrefixShape.of(spm.model)


def test_a_prefix_for_another_model_shape_is_refused(spm):
    shape = PrefixShape.of(spm.model)
    wrong = Adapter("wrong", torch.zeros(4, shape.width * 2), peft_config(4, shape, "x"))
    wrong.config["num_layers"] = 4
    with pytest.raises(UserError, match="4 layers"):
        spm.add_adapter(wrong)
    narrow = Adapter("narrow", torch.zeros(4, shape.width // 2), {"peft_type": "PREFIX_TUNING"})
    with pytest.raises(UserError, match="columns"):
        spm.add_adapter(narrow)


def greedy_reference(spm, weights: torch.Tensor, ids: list[int], new: int) -> list[int]:
    """The untouched base model, the prefix passed as its ``past_key_values``, greedy."""
    from softprompt.prefix import batch_past

    cache, _, lengths = batch_past([weights], spm.prefix_shape, torch.float32)
    n = lengths[0]
    tokens = torch.tensor([ids])
    positions = torch.arange(n, n + len(ids))[None]
    mask = torch.ones(1, n + len(ids), dtype=torch.long)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(new):
            logits = spm.model(
                input_ids=tokens, past_key_values=cache, attention_mask=mask,
                position_ids=positions, use_cache=True,
            ).logits[0, -1]  # fmt: skip
            out.append(int(logits.argmax()))
            tokens = torch.tensor([[out[-1]]])
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    return out


def test_the_engine_serves_prefix_adapters_beside_prompt_adapters_and_the_base_model(spm):
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    deep = init_prefix(spm.base, 3, "vocab", seed=1) * 1.5  # trained-looking, not the start
    spm.add_adapter(prefix_adapter(spm, "deep", deep))
    spm.add_adapter(prefix_adapter(spm, "deeper", init_prefix(spm.base, 6, "random", seed=2)))
    spm.add_adapter(Adapter("shallow", init_prompt(spm.base, 4, "vocab", seed=4)))
    engine = Engine.from_softprompt(spm, EngineConfig(max_batch_size=8))
    prompts = [spm.text_ids(t) for t in TEXTS * 2]
    names = ["deep", "deeper", "shallow", None] * 2
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    batched = engine.generate(prompts, names, params)
    for ids, name, done in zip(prompts, names, batched, strict=True):
        assert engine.generate([ids], [name], params)[0].token_ids == done.token_ids
        if name in ("deep", "deeper"):
            weights = spm.adapters[name].weights.detach()
            assert done.token_ids == greedy_reference(spm, weights, ids, 6)


def test_train_method_prefix_saves_what_peft_loads(tiny_model_dir, tmp_path, cli_main, word_data):
    import json

    train_file, held_file = word_data(48, 5, ["be kind every day", "hope and courage"])
    common = ["--model", str(tiny_model_dir), "--data", str(train_file), "--eval-data"]
    common += [str(held_file), "--epochs", "2", "--batch-size", "4", "--json"]
    out = tmp_path / "deep"
    proc = cli_main("train", *common, "--method", "prefix", "--virtual-tokens", "3",
                    "--output", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    adapter = load_adapter(out)
    assert adapter.method == "prefix" and adapter.config["num_layers"] == 2
    base = load_base_model(str(tiny_model_dir))
    peft_model = peft.PeftModel.from_pretrained(base.model, str(out))
    from softprompt.prompt import SoftPromptModel

    spm = SoftPromptModel(load_base_model(str(tiny_model_dir)))
    spm.add_adapter(adapter)
    held = ["be kind every day", "hope and courage"]
    assert peft_loss(peft_model, spm, held) == pytest.approx(evaluate(spm, held, "deep").loss)

    # A prompt adapter deepened: its virtual tokens' keys/values start the prefix.
    shallow = tmp_path / "shallow"
    assert cli_main("train", *common, "--output", str(shallow)).returncode == 0
    deepened = tmp_path / "deepened"
    proc = cli_main("train", *common, "--method", "prefix", "--init-from", str(shallow),
                    "--output", str(deepened))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    before = json.loads(proc.stdout)["heldout_loss_before"]
    # Its start scores as the prompt adapter does (but for the first text token: eval skips it).
    shallow_loss = json.loads((shallow / "loss_log.json").read_text())["evals"]
    assert before == pytest.approx(min(e["loss"] for e in shallow_loss), rel=1e-4)

    # compare, inspect and report take a prefix adapter beside a prompt adapter.
    both = ["--model", str(tiny_model_dir), "--adapter", str(out), "--adapter", str(shallow)]
    proc = cli_main("compare", *both, "--prompt", "be kind", "--max-new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {c["adapter"] for c in json.loads(proc.stdout)[0]["completions"]} >= {"deep", "shallow"}
    proc = cli_main("inspect", "--model", str(tiny_model_dir), str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout)["layers"]
    assert [x["layer"] for x in layers] == [0, 1]
    assert all(x["key_norm"] > 0 and x["model_value_norm"] > 0 for x in layers)
    report = tmp_path / "report.html"
    proc = cli_main("report", *both, "--data", str(held_file), "--prompt", "be kind",
                    "--max-new-tokens", "3", "--output", str(report))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    page = report.read_text()
    assert "key and value norms per layer" in page and "nearest vocabulary tokens" in page
    # vLLM's prompt_embeds cannot carry a prefix: refused before any model loads.
    proc = cli_main("embeds", "--model", str(tmp_path / "none"), "--adapter", str(out),
                    "--prompt", "be kind", "--base64")  # fmt: skip
    assert proc.returncode == 2 and "prefix" in proc.stderr

    # A prefix adapter cannot start a prompt; with no --method it continues as a prefix.
    refused = cli_main("train", *common, "--init-from", str(out), "--method", "prompt",
                       "--output", str(tmp_path / "x"))  # fmt: skip
    assert refused.returncode == 2 and "--method prefix" in refused.stderr
    continued = cli_main("train", *common, "--init-from", str(out), "--output", str(tmp_path / "y"))
    assert continued.returncode == 0, continued.stderr
    assert load_adapter(tmp_path / "y").method == "prefix"


def test_forward_refuses_a_prefix_adapters_ids_instead_of_running_zero_rows(spm):
    """``SoftPromptModel.forward`` embeds virtual ids; a prefix adapter's ids are placeholders
    (zero rows), so running them would silently score a different model."""
    spm.add_adapter(prefix_adapter(spm, "deep", init_prefix(spm.base, 3)))
    spm.add_adapter(Adapter("shallow", init_prompt(spm.base, 2)))
    text = spm.tokenizer("be kind")["input_ids"]
    spm.forward(torch.tensor([spm.virtual_ids("shallow") + text]))  # a prompt adapter runs
    with pytest.raises(UserError, match="prefix adapter 'deep'"):
        spm.forward(torch.tensor([spm.virtual_ids("deep") + text]))


def test_we_load_peft_cartridge_adapters_and_serve_them_in_mixed_batches(
    spm, tiny_model_dir, tmp_path
):
    # CARTRIDGE keeps a trained KV cache directly, in PREFIX_TUNING's layout; PEFT serves both
    # as past_key_values. It loads as a deep prompt, scores as PEFT scores it, and runs beside
    # prompt adapters and the base model in one batch.
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    base = load_base_model(str(tiny_model_dir)).model
    config = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():  # N(0, 1) swamps a tiny model's attention; keep it readable
        peft_model.prompt_encoder["default"].trainable_embedding.mul_(0.3)
        peft_model.prompt_encoder["default"].frozen_embedding.mul_(0.3)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "cartridge"))
    reference = peft_loss(peft_model, spm, TEXTS)

    adapter = load_adapter(tmp_path / "cartridge")
    assert adapter.method == "prefix" and adapter.num_virtual_tokens == 5
    spm.add_adapter(adapter)
    assert evaluate(spm, TEXTS, "cartridge").loss == pytest.approx(reference, rel=1e-5)

    spm.add_adapter(Adapter("shallow", init_prompt(spm.base, 4, "vocab", seed=4)))
    engine = Engine.from_softprompt(spm, EngineConfig(max_batch_size=6))
    prompts = [spm.text_ids(t) for t in TEXTS[:2]] * 3
    names = ["cartridge", "cartridge", "shallow", None, "cartridge", None]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    batched = engine.generate(prompts, names, params)
    for ids, name, done in zip(prompts, names, batched, strict=True):
        assert engine.generate([ids], [name], params)[0].token_ids == done.token_ids
        if name == "cartridge":
            weights = spm.adapters[name].weights.detach()
            assert done.token_ids == greedy_reference(spm, weights, ids, 5)
