from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt.adapters import Adapter, adapter_config, load_adapter, write_adapter_files
from softprompt.errors import UserError
from softprompt.tuning.init import init_prompt


def test_virtual_ids_map_to_prompt_rows(spm):
    rows_a = torch.randn(3, spm.hidden_size)
    rows_b = torch.randn(2, spm.hidden_size)
    spm.add_adapter(Adapter("a", rows_a))
    spm.add_adapter(Adapter("b", rows_b))
    vocab = spm.vocab_size
    assert spm.virtual_ids("a") == [vocab, vocab + 1, vocab + 2]
    assert spm.virtual_ids("b") == [vocab + 3, vocab + 4]
    assert spm.virtual_ids(None) == []
    ids = torch.tensor([[vocab + 4, 5, vocab, 1]])
    out = spm.embed(ids)[0]
    base = spm.embedding.weight
    assert torch.equal(out[0], rows_b[1])
    assert torch.equal(out[1], base[5])
    assert torch.equal(out[2], rows_a[0])
    assert torch.equal(out[3], base[1])


def test_tied_head_keeps_base_weight_and_vocab(spm):
    spm.add_adapter(Adapter("a", torch.randn(4, spm.hidden_size)))
    assert spm.model.lm_head.weight is spm.embedding.weight
    logits = spm.forward(torch.tensor([spm.encode("be kind", "a")])).logits
    assert logits.shape[-1] == spm.vocab_size


def test_token_dim_mismatch_is_a_user_error(spm):
    with pytest.raises(UserError, match="token_dim 7"):
        spm.add_adapter(Adapter("x", torch.randn(2, 7), {"base_model_name_or_path": "other/m"}))


def test_duplicate_adapter_name_refused(spm):
    spm.add_adapter(Adapter("x", torch.randn(2, spm.hidden_size)))
    with pytest.raises(UserError, match="already loaded"):
        spm.add_adapter(Adapter("x", torch.randn(2, spm.hidden_size)))


def test_init_vocab_copies_distinct_vocab_rows(spm):
    rows = init_prompt(spm.base, 5, "vocab", seed=3)
    weight = spm.embedding.weight
    matches = [int((weight == row).all(dim=1).nonzero()[0]) for row in rows]
    assert len(set(matches)) == 5


def test_init_text_repeats_text_tokens(spm):
    rows = init_prompt(spm.base, 5, "text", text="be kind")
    ids = spm.tokenizer("be kind")["input_ids"]
    weight = spm.embedding.weight
    expected = torch.stack([weight[ids[i % len(ids)]] for i in range(5)])
    assert torch.equal(rows, expected)
    with pytest.raises(UserError):
        init_prompt(spm.base, 5, "text", text="   ")


def test_init_random_matches_vocab_norm(spm):
    rows = init_prompt(spm.base, 400, "random", seed=1)
    vocab_norm = spm.embedding.weight.norm(dim=1).mean()
    assert abs(rows.norm(dim=1).mean() / vocab_norm - 1) < 0.1
    # An unscaled N(0, 1) row would have norm ~ sqrt(hidden).
    assert rows.norm(dim=1).mean() < torch.randn(400, spm.hidden_size).norm(dim=1).mean() * 2


def _save(folder: Path, rows: torch.Tensor) -> Path:
    folder.mkdir(exist_ok=True)
    write_adapter_files(folder, rows, adapter_config(Adapter("x", rows), "tiny"))
    return folder


def test_adapter_round_trip(tmp_path):
    rows = torch.randn(4, 16)
    loaded = load_adapter(_save(tmp_path / "ad", rows))
    assert loaded.name == "ad"
    assert torch.equal(loaded.weights, rows)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == 4 and config["token_dim"] == 16


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "does not exist"),
        ("no_config", "not an adapter folder"),
        ("bad_json", "not valid JSON"),
        ("lora", "LORA adapter"),
        ("corrupt", "corrupt"),
        ("pickle", "pickle"),
        ("count", "virtual tokens"),
        ("count_text", "num_virtual_tokens must be a positive integer"),
        ("count_float", "num_virtual_tokens must be a positive integer"),
        ("encoder_decoder", "encoder-decoder"),
        ("unreadable", "cannot read"),
        ("nan", "NaN"),
        ("int_rows", "not floating point"),
    ],
)
def test_bad_adapters_are_user_errors(tmp_path, monkeypatch, breakage, message):
    folder = _save(tmp_path / "ad", torch.randn(4, 16))
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    if breakage == "missing":
        folder = tmp_path / "nope"
    elif breakage == "no_config":
        config_path.unlink()
    elif breakage == "bad_json":
        config_path.write_text("{not json")
    elif breakage == "lora":
        config_path.write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    elif breakage == "corrupt":
        weights_path.write_bytes(weights_path.read_bytes()[:40])
    elif breakage == "pickle":
        weights_path.unlink()
        torch.save({"prompt_embeddings": torch.randn(4, 16)}, folder / "adapter_model.bin")
    elif breakage == "count":
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "num_virtual_tokens": 9}))
    elif breakage in ("count_text", "count_float"):
        config = json.loads(config_path.read_text())
        value = "four" if breakage == "count_text" else 4.5
        config_path.write_text(json.dumps({**config, "num_virtual_tokens": value}))
    elif breakage == "encoder_decoder":
        # PEFT's layout for encoder-decoder models: the rows of both submodules, stacked.
        _save(folder, torch.randn(8, 16))
        config = json.loads(config_path.read_text())
        config_path.write_text(
            json.dumps({**config, "num_virtual_tokens": 4, "num_transformer_submodules": 2})
        )
    elif breakage == "unreadable":
        # chmod cannot deny root, who runs CI: refuse the read the way the kernel would.
        real_text, real_bytes = Path.read_text, Path.read_bytes

        def denied(real):
            def read(self, *args, **kwargs):
                if self.name == "adapter_config.json":
                    raise PermissionError(13, "Permission denied", str(self))
                return real(self, *args, **kwargs)

            return read

        monkeypatch.setattr(Path, "read_text", denied(real_text))
        monkeypatch.setattr(Path, "read_bytes", denied(real_bytes))
    elif breakage == "nan":
        rows = torch.randn(4, 16)
        rows[1, 3] = float("nan")
        _save(folder, rows)
    elif breakage == "int_rows":
        from safetensors.torch import save_file

        save_file({"prompt_embeddings": torch.ones(4, 16, dtype=torch.int64)}, str(weights_path))
    with pytest.raises(UserError, match=message):
        load_adapter(folder)


def test_prompt_table_is_built_once_per_change(spm):
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size)))
    ids = torch.tensor([spm.encode("be kind", "a")])
    table = spm.prompt_table()
    spm.embed(ids)
    spm.forward(ids)
    assert spm.prompt_table() is table  # no concatenation per forward
    spm.add_adapter(Adapter("b", torch.randn(2, spm.hidden_size)))
    assert spm.prompt_table().shape[0] == 5
    with torch.no_grad():
        spm.adapters["a"].weights.add_(1.0)  # changed in place: the table follows
    assert torch.equal(spm.prompt_table()[:3], spm.adapters["a"].weights)
    spm.remove_adapter("a")
    assert spm.virtual_ids("b") == [spm.vocab_size, spm.vocab_size + 1]
    assert spm.prompt_table().shape[0] == 2


def test_out_of_range_virtual_id_is_an_error(spm):
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size)))
    for bad in (spm.vocab_size + 3, spm.vocab_size + 40, -1):
        with pytest.raises(UserError, match="out of range"):
            spm.embed(torch.tensor([[2, bad]]))


def test_adapter_rows_have_one_source_of_truth(spm):
    """What spm.adapters holds is what generation uses, trained or changed in place."""
    param = spm.add_adapter(Adapter("a", torch.zeros(2, spm.hidden_size)), trainable=True)
    assert spm.adapters["a"].weights is param
    with torch.no_grad():
        param.add_(0.5)
    assert torch.equal(spm.adapter_weights("a"), torch.full((2, spm.hidden_size), 0.5))
    assert torch.equal(spm.adapters["a"].weights.detach(), spm.adapter_weights("a"))


def test_pickle_loads_only_when_allowed(tmp_path):
    folder = _save(tmp_path / "ad", torch.randn(4, 16))
    rows = torch.randn(4, 16)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": rows}, folder / "adapter_model.bin")
    assert torch.equal(load_adapter(folder, allow_pickle=True).weights, rows)


def test_the_prompt_tables_gradient_is_the_same_every_time(spm):
    """Many rows reading few virtual tokens, on two threads: the gradient reaching the table
    is summed in the same order every time (advanced indexing's backward was not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        table = spm.add_adapter(Adapter("a", torch.randn(8, spm.hidden_size)), trainable=True)
        vocab = spm.vocab_size
        ids = torch.randint(vocab, vocab + 8, (64, 256), generator=torch.Generator().manual_seed(0))
        upstream = torch.randn(64, 256, spm.hidden_size, generator=torch.Generator().manual_seed(1))
        grads = []
        for _ in range(20):
            (grad,) = torch.autograd.grad((spm.embed(ids) * upstream).sum(), table)
            grads.append(grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)
