"""The model card every adapter folder gets: what the Hub and PEFT read from its metadata, and
what it says of the method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from softprompt.tuning.init import init_prompt
from softprompt.tuning.save import save_trained
from softprompt.tuning.train import TrainConfig, train

TEXTS = ["be kind every day", "be kind and brave", "kind hope every day"] * 3


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_the_card_carries_the_hubs_metadata_and_names_its_method(spm, tmp_path: Path, method):
    from softprompt.tuning.init import init_prefix

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


def test_push_uploads_the_adapter_files_and_its_card(spm, tmp_path: Path, cli_main, monkeypatch):
    import json

    from huggingface_hub import HfApi

    config = TrainConfig(virtual_tokens=3, epochs=1, lr=0.1, batch_size=4)
    result = train(spm, "kind", init_prompt(spm.base, 3), TEXTS, TEXTS[:3], config, progress=False)
    folder = save_trained(
        spm, "kind", tmp_path / "kind", config, result, {"data": "x.jsonl"}, heldout=TEXTS[:3]
    )
    assert (folder / "heldout.jsonl").is_file()
    dry = cli_main("push", str(folder), "me/kind-prompt", "--dry-run", "--private")
    assert dry.returncode == 0, dry.stderr
    assert "would upload to me/kind-prompt@main (private)" in dry.stdout
    head = dry.stdout.split("model card metadata:")[0]
    listed = [line.split()[0] for line in head.splitlines() if line.startswith("  ")]
    assert "adapter_model.safetensors" in listed and "README.md" in listed
    assert "heldout.jsonl" not in listed  # the user's data stays home
    metadata = json.loads(dry.stdout.split("model card metadata:\n", 1)[1])
    assert metadata["library_name"] == "peft" and "prompt-tuning" in metadata["tags"]
    # The real upload, with the Hub's API stood in for (no network here).
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.setdefault("repo", k))
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **k: calls.setdefault("upload", k) and None
    )
    done = cli_main("push", str(folder), "me/kind-prompt", "--revision", "v1")
    assert done.returncode == 0, done.stderr
    assert calls["repo"]["private"] is False and calls["repo"]["exist_ok"] is True
    assert sorted(calls["upload"]["allow_patterns"]) == sorted(listed)
    assert calls["upload"]["revision"] == "v1" and calls["upload"]["repo_id"] == "me/kind-prompt"
    for args, message in [
        ([str(folder), "not a repo id!"], "not a Hub repository id"),
        ([str(folder), "justname"], "owner/name"),
        ([str(tmp_path), "me/x"], "adapter"),
    ]:
        refused = cli_main("push", *args, "--dry-run")
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_adapters_load_from_the_hub_cache_offline(spm, tmp_path: Path, cli_main, monkeypatch):
    """``owner/name[@revision]`` wherever an adapter is taken: a copy in the standard Hugging
    Face cache loads with the network off; a missing one is one line."""
    import shutil

    import huggingface_hub.constants as hub_constants
    from huggingface_hub import scan_cache_dir

    from softprompt.adapters import load_adapter

    config = TrainConfig(virtual_tokens=3, epochs=1, lr=0.1, batch_size=4)
    result = train(spm, "kind", init_prompt(spm.base, 3), TEXTS, TEXTS[:3], config, progress=False)
    folder = save_trained(spm, "kind", tmp_path / "kind", config, result, {"data": "x.jsonl"})
    # The cache layout huggingface_hub writes: blobs behind snapshots/<commit>, refs/<branch>.
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--me--kind-prompt"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        shutil.copy(folder / file, snapshot / file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(commit)
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == ["me/kind-prompt"]
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref in ("me/kind-prompt", "me/kind-prompt@v1"):
        adapter = load_adapter(ref)
        assert adapter.name == "kind-prompt"
        assert torch.equal(adapter.weights, load_adapter(folder).weights)
    from softprompt.server.run import fixed_adapters

    assert fixed_adapters(["coach=me/kind-prompt@v1"]) == {"coach": snapshot}  # serve --adapter
    done = cli_main("inspect", "me/kind-prompt", "--json", "--model", str(spm.base.name))
    assert done.returncode == 0, done.stderr
    missing = cli_main("inspect", "me/not-cached", "--model", str(spm.base.name))
    assert missing.returncode == 2
    assert "me/not-cached is not in the local Hugging Face cache" in missing.stderr
