"""Training and PEFT files on every decoder family the lean forward runs, as on Llama.

For each family a tiny random model is saved as a folder (as a user's downloaded model is), then
``softprompt train`` tunes a prompt and a prefix on it; PEFT loads each adapter with the same
loss, and the engine serves both with the greedy tokens of the untouched model's own forward.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import _tiny_tokenizer
from softprompt.adapters import load_adapter
from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.insight.evaluate import evaluate
from softprompt.models import load_base_model
from softprompt.prompt import SoftPromptModel
from test_families import FAMILIES, tiny
from test_peft_parity import peft_loss
from test_prefix import greedy_reference

peft = pytest.importorskip("peft")

HELD = ["be kind every day", "hope and courage"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny model saved with the tiny tokenizer; windows wider than the texts."""
    tokenizer = _tiny_tokenizer()
    made = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        tiny(family, len(tokenizer), window=64).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        made[family] = folder
    return made


def _prompt_reference(model, rows: torch.Tensor, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        embeds = torch.cat((rows, model.get_input_embeddings()(torch.tensor(ids))))[None]
        out = model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=1,
        )  # fmt: skip
    return out[0].tolist()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", FAMILIES)
def test_train_save_peft_and_serve_on_every_family(
    folders, family, method, tmp_path, cli_main, word_data
):
    folder = folders[family]
    train_file, held_file = word_data(48, 5, HELD)
    out = tmp_path / "adapter"
    proc = cli_main(
        "train", "--model", str(folder), "--data", str(train_file), "--eval-data",
        str(held_file), "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--json",
        "--method", method, "--virtual-tokens", "3", "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    adapter = load_adapter(out)
    assert adapter.method == method

    # PEFT reads the files with the loss softprompt computes.
    spm = SoftPromptModel(load_base_model(str(folder)))
    spm.add_adapter(adapter)
    peft_model = peft.PeftModel.from_pretrained(load_base_model(str(folder)).model, str(out))
    ours = evaluate(spm, HELD, adapter.name).loss
    assert peft_loss(peft_model, spm, HELD) == pytest.approx(ours, rel=1e-4)

    # The engine, on the family's lean forward, serves it as the untouched model computes it.
    engine = Engine(spm.model, spm.tokenizer, EngineConfig(max_batch_size=4, tune=False))
    assert engine.runner.lean is not None and engine.runner.lean.family.name == family
    engine.add_adapter(adapter.name, adapter)
    ids = spm.text_ids("be kind")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    served = engine.generate([ids, ids], [adapter.name, None], params)
    untouched = load_base_model(str(folder)).model
    if method == "prefix":
        reference = greedy_reference(spm, adapter.weights, ids, 6)
    else:
        reference = _prompt_reference(untouched, adapter.weights, ids, 6)
    assert served[0].token_ids == reference
    no_rows = adapter.weights.new_zeros(0, spm.hidden_size)
    assert served[1].token_ids == _prompt_reference(untouched, no_rows, ids, 6)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_starting_rows_are_what_the_models_embedding_gives(folders, family):
    """Gemma scales its rows as it looks them up: a prompt started from text or vocabulary rows
    must start as those tokens' inputs would reach the model, scaled alike."""
    from softprompt.tuning.init import init_prompt

    base = load_base_model(str(folders[family]))
    table = base.model.get_input_embeddings()
    ids = torch.tensor(base.tokenizer("be kind")["input_ids"])
    with torch.no_grad():
        expected = table(ids)
    started = init_prompt(base, len(ids), "text", text="be kind")
    torch.testing.assert_close(started, expected)
    vocab = init_prompt(base, 4, "vocab", seed=0)
    norms = table(torch.arange(table.num_embeddings)).norm(dim=-1)
    assert norms.min() <= vocab.norm(dim=-1).min() and vocab.norm(dim=-1).max() <= norms.max()
