"""The model card every adapter folder gets: what the Hub and PEFT read from its metadata, and
what it says of the method."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from softprompt.prompt import init_prompt
from softprompt.train import TrainConfig, save_trained, train

TEXTS = ["be kind every day", "be kind and brave", "kind hope every day"] * 3


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_the_card_carries_the_hubs_metadata_and_names_its_method(spm, tmp_path: Path, method):
    from softprompt.prefix import init_prefix

    config = TrainConfig(virtual_tokens=3, epochs=1, lr=0.1, batch_size=4, method=method)
    rows = init_prompt(spm.base, 3) if method == "prompt" else init_prefix(spm.base, 3)
    result = train(spm, "kind", rows, TEXTS, TEXTS[:3], config, progress=False)
    extra = {"data": "someone/kind-texts", "eval_data": "examples:quotes:heldout"}
    folder = save_trained(spm, "kind", tmp_path / "kind", config, result, extra)
    card = ModelCard.load(folder / "README.md")  # the Hub's own parser
    data = card.data
    assert data.library_name == "peft" and data.base_model == spm.base.name
    assert data.pipeline_tag == "text-generation"
    tag = "prompt-tuning" if method == "prompt" else "prefix-tuning"
    assert tag in data.tags and "softprompt" in data.tags
    assert data.datasets == ["someone/kind-texts"]  # a Hub id; local files are not listed
    (held_out,) = data.eval_results
    assert held_out.metric_type == "loss" and held_out.dataset_type == "examples:quotes:heldout"
    assert held_out.metric_value == pytest.approx(result.loss_after, abs=1e-3)
    kind = "PREFIX_TUNING" if method == "prefix" else "PROMPT_TUNING"
    assert f"PEFT {kind} adapter" in card.text
    assert ("prefix tuning" in card.text) == (method == "prefix")
