from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt.data import heldout_source, load_texts, pad_left, split_heldout
from softprompt.errors import UserError


@pytest.mark.parametrize("name", ["role-prompts", "quotes"])
def test_bundled_examples(name):
    train = load_texts(f"examples:{name}").texts
    held = load_texts(f"examples:{name}:heldout").texts
    assert len(train) + len(held) >= 150
    assert len(held) >= 20
    assert not set(train) & set(held)
    assert len(set(train)) == len(train)
    if name == "role-prompts":
        assert all(t.startswith("I want you to act as") for t in train + held)
    assert heldout_source(f"examples:{name}") == f"examples:{name}:heldout"


def test_unknown_example_lists_choices():
    with pytest.raises(UserError, match="examples:quotes"):
        load_texts("examples:nope")


def test_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"quote": "be kind"}\n{"quote": "be brave"}\n')
    (tmp_path / "b.csv").write_text("quote,author\nbe kind,me\nbe brave,you\n")
    (tmp_path / "c.txt").write_text("be kind\nbe brave\n")
    (tmp_path / "d.json").write_text(json.dumps([{"quote": "be kind"}, {"quote": "be brave"}]))
    import pandas as pd

    pd.DataFrame({"quote": ["be kind", "be brave"]}).to_parquet(tmp_path / "e.parquet")
    for name in ["a.jsonl", "b.csv", "d.json", "e.parquet"]:
        assert load_texts(str(tmp_path / name), "quote").texts == ["be kind", "be brave"]
    assert load_texts(str(tmp_path / "c.txt")).texts == ["be kind", "be brave"]
    # Without --text-field, the only string field is chosen.
    assert load_texts(str(tmp_path / "a.jsonl")).field == "quote"


def test_dataset_folder_goes_through_load_dataset(tmp_path):
    # A folder laid out like a Hub dataset repository: the code path Hub ids take.
    repo = tmp_path / "english_quotes"
    repo.mkdir()
    (repo / "train.jsonl").write_text(
        "".join(json.dumps({"quote": f"quote {i}", "author": "a"}) + "\n" for i in range(5))
    )
    texts = load_texts(str(repo), "quote", max_samples=3)
    assert texts.texts == ["quote 0", "quote 1", "quote 2"]


def test_missing_field_names_the_fields(texts_file):
    with pytest.raises(UserError, match="its fields are: text, id"):
        load_texts(str(texts_file), "prompt")


def test_ambiguous_fields_ask_for_one(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text('{"a": "x", "b": "y"}\n')
    with pytest.raises(UserError, match="--text-field"):
        load_texts(str(path))


def test_empty_and_missing(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": "  "}\n')
    with pytest.raises(UserError, match="no non-empty examples"):
        load_texts(str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))


def test_unreachable_hub_dataset_is_a_user_error():
    with pytest.raises(UserError, match="cannot load dataset"):
        load_texts("nobody-here/no-such-dataset-xyz", "text")


def test_split_heldout_is_deterministic_and_disjoint():
    texts = [f"t{i}" for i in range(20)]
    train, held = split_heldout(texts, 0.1, seed=1)
    assert len(held) == 2 and not set(train) & set(held)
    assert split_heldout(texts, 0.1, seed=1) == (train, held)
    with pytest.raises(UserError):
        split_heldout(["one"], 0.1, seed=0)


def test_pad_left_positions_start_at_first_real_token():
    batch = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert torch.equal(batch["position_ids"][1, -1], torch.tensor(0))


def test_the_bundled_task_sets_are_what_their_generator_writes(tmp_path, monkeypatch):
    """``benchmarks/make_task_sets.py`` rewrites the shipped files byte for byte, so the sets
    can be regenerated and reviewed from their source."""
    import importlib.util
    from importlib import resources

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "make_task_sets.py"
    spec = importlib.util.spec_from_file_location("make_task_sets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "bundled")
    monkeypatch.setattr(module, "UNSEEN", tmp_path / "unseen")
    module.main()
    shipped = resources.files("softprompt") / "examples"
    unseen = path.parent / "data" / "unseen"
    for folder, names, where in (
        (tmp_path / "bundled", SUITE, shipped),
        (tmp_path / "unseen", ("dispatch", "closing"), unseen),
    ):
        for name in names:
            for part in ("train", "heldout"):
                file = f"{name}.{part}.jsonl"
                assert (folder / file).read_bytes() == (where / file).read_bytes(), file


SUITE = ("routing", "pirate", "shelving", "booking", "signoff", "initials")


@pytest.mark.parametrize("name", SUITE)
def test_each_suite_set_holds_out_rows_its_training_part_lacks(name):
    # The suite's held-out parts judge what a prompt learned, not what it memorised: no
    # held-out prompt (or conversation) is a training one.
    train = load_texts(f"examples:{name}")
    held = load_texts(f"examples:{name}:heldout")
    assert train.format == held.format != "text"
    assert len(train.examples) >= 97 and len(held.examples) >= 32
    seen = {json.dumps(e.as_json(), sort_keys=True) for e in train.examples}
    key = "prompt" if train.format == "completion" else "messages"
    inputs = {json.dumps(e.as_json()[key]) for e in train.examples}
    for e in held.examples:
        assert json.dumps(e.as_json(), sort_keys=True) not in seen
        if key == "prompt":
            assert json.dumps(e.as_json()[key]) not in inputs
