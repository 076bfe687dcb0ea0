"""The front end for remote engines: a base model's tokenizer, config and input embedding table,
without the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from softprompt.adapters import Adapter
from softprompt.embeds import prompt_embeds
from softprompt.errors import UserError
from softprompt.frontend import embedding_name, load_front_end
from softprompt.models import load_base_model


def test_the_front_end_reads_the_models_own_embedding_table(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir))
    front = load_front_end(str(tiny_model_dir))
    assert torch.equal(front.embedding.weight, base.model.get_input_embeddings().weight)
    table = base.model.get_input_embeddings()
    assert front.hidden_size == table.embedding_dim == 16
    assert front.vocab_size == table.num_embeddings == len(base.tokenizer)
    rows = torch.randn(3, front.hidden_size)
    adapter = Adapter("a", rows)
    want = prompt_embeds(base.model, base.tokenizer, adapter, "be kind every day")
    got = prompt_embeds(front, front.tokenizer, adapter, "be kind every day")
    assert torch.equal(got, want)  # what goes upstream is what the full model would take


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3_text", "phi3"])
def test_the_front_end_embeds_as_each_family_does(family, tmp_path):
    """Gemma's embedding module scales its rows by sqrt(hidden); vLLM takes prompt_embeds as
    that module's output, so the front end must scale the text's rows as the model does."""
    from conftest import _tiny_tokenizer
    from test_families import tiny

    tokenizer = _tiny_tokenizer()
    model = tiny(family, len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    front = load_front_end(str(tmp_path))
    base = load_base_model(str(tmp_path))  # the tokenizer as the folder gives it
    adapter = Adapter("a", torch.randn(3, model.config.hidden_size))
    want = prompt_embeds(base.model, base.tokenizer, adapter, "be kind every day")
    got = prompt_embeds(front, front.tokenizer, adapter, "be kind every day")
    assert torch.equal(got, want)


def test_a_sharded_checkpoint_is_read_through_its_index(tiny_model_dir, tmp_path):
    base = load_base_model(str(tiny_model_dir))
    folder = tmp_path / "sharded"
    base.model.save_pretrained(folder, max_shard_size="2KB")
    base.tokenizer.save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = embedding_name(base.model.config)
    assert len(set(index["weight_map"].values())) > 1 and key in index["weight_map"]
    front = load_front_end(str(folder))
    assert torch.equal(front.embedding.weight, base.model.get_input_embeddings().weight)


def test_a_folder_without_the_table_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="has no model.safetensors"):
        load_front_end(str(folder))
    with pytest.raises(UserError, match="not a model folder"):
        load_front_end(str(tmp_path))


RSS = """
import os
from softprompt.{module} import {loader}
held = {loader}()
model = held.model if hasattr(held, "model") else held.embedding
total = sum(float(p.sum()) for p in model.parameters())  # every weight read once, as serving does
pages = int(open("/proc/self/statm").read().split()[1])
print(pages * os.sysconf("SC_PAGE_SIZE"))
"""


@pytest.mark.slow
def test_the_front_end_holds_a_fraction_of_the_full_models_memory():
    # Each in its own process, the same imports: resident bytes after loading the embedded
    # model whole, and after loading only its front end.
    def resident(module: str, loader: str) -> int:
        code = RSS.format(module=module, loader=loader)
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
        )
        return int(done.stdout.strip().splitlines()[-1])

    full = resident("models", "load_base_model")
    front = resident("frontend", "load_front_end")
    model = load_base_model().model
    layers = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if p is not model.get_input_embeddings().weight
    )
    # Everything but the embedding table (405 MiB of float32 weights) is left out.
    assert full - front > 0.8 * layers, (full, front, layers)
