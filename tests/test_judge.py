"""--keep metric: a run keeps the rows of its best held-out task metric, not only of its loss."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from softprompt.data import Example
from softprompt.insight.scoring import choice_accuracy, exact_match
from softprompt.tuning.init import init_prompt
from softprompt.tuning.judge import MAX_ANSWER_TOKENS, task_judge
from softprompt.tuning.train import TrainConfig, train

LABELS = ["hope", "courage", "light"]
MESSAGES = ["be kind every day", "small steps", "the mountain river", "help me", "two nice things"]
CLASSIFIED = [
    Example(prompt=f"{m} :", completion=f" {LABELS[i % 3]}") for i, m in enumerate(MESSAGES * 3)
]
ANSWERS = [
    Example(prompt=f"{m} ?", completion=f" {m.split()[-1]} {m.split()[0]}") for m in MESSAGES * 3
]


def test_the_judge_follows_the_data(spm):
    judge = task_judge(spm, CLASSIFIED, CLASSIFIED[:5])
    assert judge is not None and judge.metric == "choice"
    assert judge.labels == (" hope", " courage", " light")
    # completions that do not repeat as labels: short answers, judged by exact match
    judge = task_judge(spm, ANSWERS, ANSWERS[:5])
    assert judge is not None and judge.metric == "exact" and 2 < judge.max_new_tokens < 8
    # a held-out reference that is not a training label: exact match, not a ranking among labels
    other = [Example(prompt="hope :", completion=" brave")]
    assert task_judge(spm, CLASSIFIED, other).metric == "exact"  # type: ignore[union-attr]
    # no task metric: the run judges by loss
    chat = [Example(completion="hope", messages=(("user", "help me"),))] * 8
    assert task_judge(spm, chat, chat[:2]) is None
    assert task_judge(spm, [Example(completion="be kind")] * 8, [Example("be brave")]) is None
    long = [Example(prompt="help ?", completion=" hope" * (MAX_ANSWER_TOKENS + 1))] * 8
    assert task_judge(spm, long, long[:2]) is None


def _kept(result):
    """The evaluation whose rows were kept."""
    return [e for e in result.evals if e["step"] == result.best_step][-1]


@pytest.mark.parametrize("data", ["classified", "answers"])
def test_keep_metric_keeps_the_rows_of_the_best_held_out_metric(spm, data):
    rows = CLASSIFIED if data == "classified" else ANSWERS
    config = TrainConfig(virtual_tokens=4, epochs=4, lr=0.3, batch_size=4, keep="metric")
    start = init_prompt(spm.base, 4, "vocab", None)
    result = train(spm, "judged", start, rows, rows[:6], config, progress=False)
    metric = "choice" if data == "classified" else "exact"
    assert result.kept_by.startswith(
        "held-out accuracy" if metric == "choice" else "held-out exact match"
    )
    scores = [e["metric"] for e in result.evals]
    assert len(scores) == config.epochs + 1 and all(0 <= s <= 1 for s in scores)
    best = max((e["metric"], -e["loss"]) for e in result.evals)
    kept = _kept(result)
    assert (kept["metric"], -kept["loss"]) == best  # the metric first, the loss on ties
    # the rows left in the model (and saved) are the kept ones: scored again, the same
    if metric == "choice":
        again = choice_accuracy(spm, rows[:6], "judged", choices=[r.completion for r in rows[:3]])
    else:
        again = exact_match(spm, rows[:6], "judged", max_new_tokens=8, first_lines=True)
    assert again.accuracy == kept["metric"]


def test_keep_metric_judges_by_the_metric_where_the_loss_would_not(spm, monkeypatch):
    # A judge that prefers the first evaluation: the loss falls every epoch, so --keep best
    # would keep the last rows; --keep metric keeps the starting ones.
    from softprompt.tuning import judge as judge_module

    calls = []

    def score(self, spm, adapter, texts):
        calls.append(adapter)
        return 1.0 if len(calls) == 1 else 0.5

    monkeypatch.setattr(judge_module.Judge, "score", score)
    config = TrainConfig(virtual_tokens=4, epochs=3, lr=0.3, batch_size=4, keep="metric")
    start = init_prompt(spm.base, 4, "vocab", None)
    result = train(spm, "judged", start, CLASSIFIED, CLASSIFIED[:6], config, progress=False)
    assert len(calls) == config.epochs + 1
    losses = [e["loss"] for e in result.evals]
    assert losses[-1] < losses[0]
    assert result.best_step == 0
    assert spm.adapter_weights("judged").equal(start)


def test_train_keep_metric_on_the_command_line(tiny_model_dir, tmp_path, cli_main):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": e.prompt, "completion": e.completion} for e in CLASSIFIED * 4]
    write_jsonl(data, rows)
    out = tmp_path / "judged"
    done = cli_main(
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--epochs", "2",
        "--keep", "metric", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "by held-out accuracy among the 3 labels" in done.stdout
    log = json.loads((out / "loss_log.json").read_text())
    assert log["kept_by"] == "held-out accuracy among the 3 labels"
    assert all("metric" in e for e in log["evals"])
