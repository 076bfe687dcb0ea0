"""Task metrics: rank classification against a one-row-at-a-time reference, exact match, and
``softprompt eval --metric`` as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt.data import Example
from softprompt.engine import SamplingParams
from softprompt.errors import UserError
from softprompt.generate import Request, generate
from softprompt.prompt import Adapter
from softprompt.scoring import choice_accuracy, exact_match

LABELS = ["the river", "mountain", "small steps up", "courage and hope"]
PROMPTS = [
    "i want you to act as a poet",
    "be kind every day",
    "there are two nice things",
    "hope is",
    "my first request is",
    "small steps up the",
]


def _rows() -> list[Example]:
    return [Example(completion=LABELS[i % 4], prompt=p) for i, p in enumerate(PROMPTS)]


def _loglik(spm, adapter: str | None, prompt: str, candidate: str) -> float:
    """log p(candidate | virtual tokens, prompt), one forward of one unpadded row."""
    prompt_ids = spm.tokenizer(prompt)["input_ids"]
    cand = spm.tokenizer(candidate, add_special_tokens=False)["input_ids"]
    ids = spm.virtual_ids(adapter) + prompt_ids + cand
    with torch.no_grad():
        logits = spm.forward(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(ids) - len(cand)
    return sum(float(logits[start + j - 1, t]) for j, t in enumerate(cand))


@pytest.mark.parametrize("adapter", [None, "a"])
def test_choice_picks_the_most_likely_candidate_as_one_row_at_a_time_does(spm, adapter):
    weights = torch.randn(3, spm.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    spm.add_adapter(Adapter("a", weights))
    rows = _rows()
    result = choice_accuracy(spm, rows, adapter, "words", batch_size=5)
    expected_picks = []
    for row in rows:
        scores = [_loglik(spm, adapter, row.prompt, c) for c in LABELS]
        expected_picks.append(LABELS[max(range(4), key=scores.__getitem__)])
    hits = sum(p == r.completion for p, r in zip(expected_picks, rows, strict=True))
    assert result.accuracy == pytest.approx(hits / len(rows)) and result.n == len(rows)
    chosen = {label: 0 for label in LABELS}
    for picks in result.labels.values():
        for label, count in picks.items():
            chosen[label] += count
    assert chosen == {label: expected_picks.count(label) for label in LABELS}
    assert result.accuracy_norm is not None and 0 <= result.accuracy_norm <= 1


def test_choice_refuses_what_it_cannot_rank(spm):
    with pytest.raises(UserError, match="not among --choices"):
        choice_accuracy(spm, _rows(), None, "words", choices=["the river", "mountain"])
    with pytest.raises(UserError, match="at least two"):
        choice_accuracy(spm, [Example(completion="river", prompt="be")], None)
    with pytest.raises(UserError, match="prompt/completion"):
        choice_accuracy(spm, [Example(completion="river")] * 2, None)


def test_exact_counts_the_greedy_completions_equal_to_the_reference(spm):
    params = SamplingParams(max_new_tokens=4)
    own = generate(spm, [Request(p) for p in PROMPTS[:4]], params)
    # The model's own greedy completions, in other case and spacing: hits after normalising.
    rows = [
        Example(completion=f"  {o.upper()} ", prompt=p)
        for p, o in zip(PROMPTS[:4], own, strict=True)
    ]
    rows += [Example(completion="nothing like it", prompt=p) for p in PROMPTS[4:]]
    result = exact_match(spm, rows, None, "words", max_new_tokens=4)
    assert result.accuracy == pytest.approx(4 / 6) and result.n == 6
    assert [m["prompt"] for m in result.misses] == PROMPTS[4:]


def test_eval_metrics_from_the_cli(tiny_model_dir, tmp_path: Path, cli_main):
    data = tmp_path / "labels.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in _rows()
        )
    )
    done = cli_main(
        "eval", "--model", str(tiny_model_dir), "--data", str(data),
        "--metric", "loss", "--metric", "choice", "--metric", "exact", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["metric"] for r in records] == ["loss", "choice", "exact"]
    assert all(r["n"] == len(PROMPTS) and r["adapter"] is None for r in records)
    assert set(records[1]["labels"]) == set(LABELS) and 0 <= records[1]["accuracy"] <= 1
    table = cli_main(
        "eval", "--model", str(tiny_model_dir), "--data", str(data), "--metric", "choice"
    )
    assert table.returncode == 0 and "task accuracy" in table.stdout and "gold" in table.stdout
    text = tmp_path / "texts.jsonl"
    text.write_text(json.dumps({"text": "be kind"}) + "\n")
    refused = cli_main(
        "eval", "--model", str(tiny_model_dir), "--data", str(text), "--metric", "choice"
    )
    assert refused.returncode == 2 and "needs prompt/completion data" in refused.stderr


def test_label_init_starts_from_the_labels_own_rows(spm):
    from softprompt.prompt import init_prompt

    rows = init_prompt(spm.base, 6, "labels", labels=LABELS)
    table = spm.embedding.weight.detach()
    for i, label in enumerate(LABELS):
        ids = spm.tokenizer(label, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(rows[i], table[ids].mean(dim=0))
    vocab = init_prompt(spm.base, 2, "vocab")
    torch.testing.assert_close(rows[4:], vocab)  # the rest as --init vocab would start
    assert init_prompt(spm.base, 2, "labels", labels=LABELS).shape == (2, spm.hidden_size)


def test_train_init_labels_from_the_cli(tiny_model_dir, tmp_path: Path, cli_main):
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r.as_json()) + "\n" for r in _rows() * 3))
    model = ["--model", str(tiny_model_dir), "--epochs", "1"]
    for method in ("prompt", "prefix"):
        out = tmp_path / method
        done = cli_main(
            "train", *model, "--data", str(data), "--init", "labels", "--method", method,
            "--virtual-tokens", "5", "--output", str(out), "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads((out / "training_config.json").read_text())["init"] == "labels"
    text = tmp_path / "texts.jsonl"
    text.write_text(json.dumps({"text": "be kind"}) + "\n" + json.dumps({"text": "hope"}) + "\n")
    refused = cli_main(
        "train", *model, "--data", str(text), "--init", "labels", "--output", str(tmp_path / "x")
    )
    assert refused.returncode == 2 and "prompt/completion data" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_shots_are_balanced_over_labels_and_put_before_each_prompt():
    from softprompt.scoring import in_context, pick_shots

    pool = [Example(completion=LABELS[i % 4], prompt=f"p{i}") for i in range(40)]
    shots = pick_shots(pool, 8, seed=3)
    assert sorted(s.completion for s in shots) == sorted(LABELS * 2)
    assert shots == pick_shots(pool, 8, seed=3)  # a fixed seed gives the same shots
    with pytest.raises(UserError, match="needs 41"):
        pick_shots(pool, 41)
    row = Example(completion="x", prompt="q")
    (framed,) = in_context([row], shots[:2], "Route it.")
    expected = "\n\n".join(["Route it.", *(s.prompt + s.completion for s in shots[:2]), "q"])
    assert framed == Example(completion="x", prompt=expected)


def test_eval_runs_the_baselines_beside_the_adapters(tiny_model_dir, tmp_path: Path, cli_main):
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r.as_json()) + "\n" for r in _rows()))
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(
            json.dumps({"prompt": f"the {w}", "completion": LABELS[i % 4]}) + "\n"
            for i, w in enumerate("river light hope teacher chef guide poet coach".split())
        )
    )
    done = cli_main(
        "eval", "--model", str(tiny_model_dir), "--data", str(data), "--metric", "choice",
        "--few-shot", "4", "--shots-from", str(pool), "--instruction", "be kind", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["context"] for r in records] == [None, "instruction", "4-shot"]
    assert all(r["n"] == 6 and r["metric"] == "choice" for r in records)
    refused = cli_main(
        "eval", "--model", str(tiny_model_dir), "--data", str(data), "--few-shot", "2"
    )
    assert refused.returncode == 2 and "--shots-from" in refused.stderr
