"""Training rows and eval scores say what they mean: EOS only where a text ends, no empty scores."""

from __future__ import annotations

import json

import pytest

from softprompt.errors import UserError
from softprompt.evaluate import evaluate, training_rows


def test_cut_texts_get_no_eos(spm):
    eos = spm.tokenizer.eos_token_id
    texts = ["be kind", "be kind every day and small steps", "hope is a light"]
    rows, cut = training_rows(spm, texts, None, max_length=4)
    assert cut == 2
    assert (
        [ids for ids, _ in rows]
        == [
            spm.text_ids("be kind") + [eos],
            spm.text_ids(texts[1])[:4],  # cut: the text does not end here, so no EOS
            spm.text_ids(texts[2])[:4],  # 4 tokens: no room for its EOS, so it counts as cut
        ]
    )
    assert all(eos not in ids for ids, _ in rows[1:])


def test_cut_rows_keep_their_virtual_tokens(spm):
    from softprompt.prompt import Adapter

    spm.add_adapter(Adapter("a", spm.embedding.weight[:3].detach().clone()))
    rows, cut = training_rows(spm, ["be kind every day and small steps"], "a", max_length=3)
    assert cut == 1
    assert rows[0] == (spm.virtual_ids("a") + spm.text_ids("be kind every")[:3], 3)


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
