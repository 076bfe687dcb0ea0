"""Training rows and eval scores say what they mean: EOS only where a text ends, no empty scores."""

from __future__ import annotations

import json

import pytest

from softprompt.errors import UserError
from softprompt.insight.evaluate import evaluate
from softprompt.rows import training_rows


def test_cut_texts_get_no_eos(spm):
    eos = spm.tokenizer.eos_token_id
    texts = ["be kind", "be kind every day and small steps", "hope is a light"]
    rows, cut = training_rows(spm, texts, None, max_length=4)
    assert cut == 2
    assert (
        [ids for ids, _, _ in rows]
        == [
            spm.text_ids("be kind") + [eos],
            spm.text_ids(texts[1])[:4],  # cut: the text does not end here, so no EOS
            spm.text_ids(texts[2])[:4],  # 4 tokens: no room for its EOS, so it counts as cut
        ]
    )
    assert all(eos not in ids for ids, _, _ in rows[1:])


def test_cut_rows_keep_their_virtual_tokens(spm):
    from softprompt.adapters import Adapter

    spm.add_adapter(Adapter("a", spm.embedding.weight[:3].detach().clone()))
    rows, cut = training_rows(spm, ["be kind every day and small steps"], "a", max_length=3)
    assert cut == 1
    assert rows[0] == (spm.virtual_ids("a") + spm.text_ids("be kind every")[:3], 3, [True] * 3)


def test_evaluate_with_nothing_to_score_is_an_error(spm):
    with pytest.raises(UserError, match="nothing to score"):
        evaluate(spm, [], None, data_name="empty")


def test_evaluate_reports_cut_texts(spm):
    result = evaluate(spm, ["be kind every day and small steps", "be kind"], None, max_length=4)
    assert result.cut == 1
    # Scored: 3 of the cut text's 4 tokens and "kind" + EOS of the other (first tokens are not).
    assert result.tokens == 3 + 2


@pytest.mark.parametrize("value", ["-1", "0"])
def test_negative_max_samples_is_refused(tiny_model_dir, texts_file, value, cli_main):
    _cli = cli_main
    proc = _cli("eval", "--model", str(tiny_model_dir), "--data", str(texts_file))
    assert proc.returncode == 0, proc.stderr
    proc = _cli(
        "eval", "--model", str(tiny_model_dir), "--data", str(texts_file), "--max-samples", value
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"softprompt: error: --max-samples must be at least 1, not {value}"
    )


def test_train_says_how_many_texts_were_cut(tiny_model_dir, texts_file, tmp_path, cli_main):
    _cli = cli_main
    out = tmp_path / "cut"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(texts_file)]
    args += ["--eval-data", str(texts_file), "--output", str(out), "--epochs", "1"]
    proc = _cli(*args, "--max-length", "5")
    assert proc.returncode == 0, proc.stderr
    # texts_file has 6 texts; 5 have 5 or more tokens, so no room for an EOS.
    assert "note: 5 of 6 training texts did not fit in --max-length 5" in proc.stdout
    proc = _cli(*args, "--max-length", "5", "--json", "--overwrite")
    assert json.loads(proc.stdout)["texts_cut"] == 5


def test_max_length_follows_the_data_up_to_the_cap(cli_main, tiny_model_dir, tmp_path):
    """Without --max-length, train and eval give every text the tokens it needs (EOS included),
    up to 256, and say so; only texts past the cap are cut."""
    long_text = " ".join(["be kind every day"] * 20)  # 80 words: past the old default of 64
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in [long_text, "hope", "be brave"] * 2)
    )
    out = tmp_path / "a"
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--data", str(data)]
    done = cli_main(
        "train", *common, "--eval-data", str(data), "--epochs", "1", "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "max length: 81 text tokens (the longest training text's, EOS included)" in done.stdout
    assert json.loads((out / "training_config.json").read_text())["max_length"] == 81
    assert json.loads((out / "loss_log.json").read_text())["texts_cut"] == 0
    done = cli_main("eval", *common, "--adapter", str(out), "--json")
    assert [r["texts_cut"] for r in json.loads(done.stdout)] == [0, 0]
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"text": " ".join(["hope"] * 300)}) + "\n")
    done = cli_main("eval", "--model", str(tiny_model_dir), "--data", str(huge), "--json")
    assert [r["texts_cut"] for r in json.loads(done.stdout)] == [1]  # cut at the cap of 256
    done = cli_main("train", *common, "--max-length", "0", "--output", str(tmp_path / "b"))
    assert done.returncode == 2 and "--max-length must be at least 2" in done.stderr
