"""Several prompts in one run (``train --task NAME=DATA[:FIELD]``): rows of all tasks share
batches, yet each task's gradient is the one its own rows give; each is saved, evaluated and
resumed as its own adapter."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.adapters import Adapter, load_adapter
from softprompt.insight.evaluate import evaluate
from softprompt.rows import batch_loss, training_rows
from softprompt.tuning import train as train_module
from softprompt.tuning.init import init_prompt
from softprompt.tuning.train import Task, TrainConfig, task_losses, train_tasks
from test_cli import assert_user_error
from test_resume import untimed
from test_train import TEXTS

OTHER = [
    "the mountain and the river",
    "a light in the river",
    "small steps up the mountain",
    "hope is a light",
    "the river and the light",
    "up the mountain every day",
] * 3


def test_a_task_gets_the_gradient_of_its_own_rows_whatever_shares_the_batch(spm):
    a = spm.add_adapter(Adapter("a", init_prompt(spm.base, 3, seed=1)), trainable=True)
    b = spm.add_adapter(Adapter("b", init_prompt(spm.base, 5, seed=2)), trainable=True)
    rows_a, _ = training_rows(spm, TEXTS[:5], "a", 16)
    rows_b, _ = training_rows(spm, OTHER[:4], "b", 16)
    mixed = [(*row, 0) for row in rows_a] + [(*row, 1) for row in rows_b]
    mixed = mixed[::2] + mixed[1::2]  # interleaved, and of different lengths
    totals, counts = task_losses(spm, mixed, 2)
    (totals / counts).sum().backward()
    mixed_grads = a.grad.clone(), b.grad.clone()
    for param, rows, grad in ((a, rows_a, mixed_grads[0]), (b, rows_b, mixed_grads[1])):
        a.grad = b.grad = None
        total, count = batch_loss(spm, rows, skip_first=False)
        (total / count).backward()
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-6)
    assert counts.tolist() == [
        sum(len(ids) - n for ids, n, _ in rows_a),
        sum(len(ids) - n for ids, n, _ in rows_b),
    ]


def _tasks(spm):
    return [
        Task("a", init_prompt(spm.base, 4, seed=1), TEXTS, TEXTS[:4]),
        Task("b", init_prompt(spm.base, 4, seed=2), OTHER, OTHER[:3]),
    ]


def test_each_task_is_trained_and_evaluated_on_its_own(spm):
    config = TrainConfig(virtual_tokens=4, epochs=3, lr=0.1, batch_size=4, max_length=16)
    results = train_tasks(spm, _tasks(spm), config, progress=False)
    assert [r.name for r in results] == ["a", "b"]
    for result, held in zip(results, (TEXTS[:4], OTHER[:3]), strict=True):
        assert len(result.evals) == 4  # before, and after each epoch
        assert result.loss_after < result.loss_before
        kept = evaluate(spm, held, result.name, batch_size=16, max_length=16)
        assert kept.loss == pytest.approx(result.loss_after, abs=1e-6)
    # Each row is seen once per epoch, whichever batches it lands in.
    assert results[0].samples == 3 * len(TEXTS) and results[1].samples == 3 * len(OTHER)


@pytest.mark.parametrize("reparam", ["none", "residual"])
def test_an_interrupted_run_of_several_tasks_resumes_to_the_same_prompts(
    spm, tmp_path, monkeypatch, reparam
):
    # With --reparam residual the checkpoint holds each task's MLP as well as its rows.
    config = TrainConfig(
        virtual_tokens=4,
        epochs=2,
        lr=0.1,
        batch_size=4,
        max_length=16,
        checkpoint_every=3,
        reparam=reparam,
    )
    whole = train_tasks(spm, _tasks(spm), config, progress=False)
    expected = [spm.adapter_weights(n).clone() for n in ("a", "b")]
    for name in ("a", "b"):
        spm.remove_adapter(name)

    real, calls = train_module.task_losses, []

    def dies_at_step_8(*args):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "task_losses", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_tasks(spm, _tasks(spm), config, progress=False, checkpoints=tmp_path)
    monkeypatch.setattr(train_module, "task_losses", real)
    for name in ("a", "b"):
        spm.remove_adapter(name)
    resumed = train_tasks(
        spm, _tasks(spm), config, progress=False, checkpoints=tmp_path, resume=True
    )
    assert resumed[0].resumed_from == 6
    # The clock of training steps carries over, and leaves evaluation time out.
    seconds = [e["train_seconds"] for e in resumed[0].evals]
    assert seconds == sorted(seconds) and seconds[0] == 0.0 < seconds[-1]
    for name, rows in zip(("a", "b"), expected, strict=True):
        assert torch.equal(spm.adapter_weights(name), rows)
    for r, w in zip(resumed, whole, strict=True):
        assert (
            untimed(r.evals) == untimed(w.evals)
            and r.steps == w.steps
            and r.best_step == w.best_step
        )


def test_train_tasks_from_the_cli(tiny_model_dir, tmp_path, cli_main):
    roles, quotes = tmp_path / "roles.jsonl", tmp_path / "quotes.jsonl"
    roles.write_text("".join(json.dumps({"prompt": t, "n": 1}) + "\n" for t in TEXTS))
    quotes.write_text("".join(json.dumps({"text": t}) + "\n" for t in OTHER))
    out = tmp_path / "adapters"
    (out / "kept").mkdir(parents=True)
    (out / "kept" / "mine.txt").write_text("a user's file")
    proc = cli_main(
        "train", "--model", str(tiny_model_dir), "--task", f"roles={roles}:prompt",
        "--task", f"quotes={quotes}", "--output", str(out), "--epochs", "2",
        "--virtual-tokens", "3", "--lr", "0.1", "--batch-size", "4", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["tasks"]
    assert [s["adapter"] for s in summary] == [str(out / "roles"), str(out / "quotes")]
    assert (out / "kept" / "mine.txt").read_text() == "a user's file"
    for s, name, other in zip(summary, ("roles", "quotes"), ("quotes", "roles"), strict=True):
        folder = out / name
        adapter = load_adapter(folder)
        assert adapter.weights.shape[0] == 3
        assert s["heldout_loss_after"] < s["heldout_loss_before"]
        config = json.loads((folder / "training_config.json").read_text())
        assert config["trained_with"] == [other]
        assert config["eval_data"] == "heldout.jsonl"  # 10% of its own data, kept beside it
        held = [json.loads(line)["text"] for line in (folder / "heldout.jsonl").open()]
        assert set(held) <= set(TEXTS if name == "roles" else OTHER)
        log = json.loads((folder / "loss_log.json").read_text())
        assert min(e["loss"] for e in log["evals"]) == s["heldout_loss_after"]
    # eval of a saved task adapter gives the held-out loss training reported.
    proc = cli_main(
        "eval", "--model", str(tiny_model_dir), "--adapter", str(out / "quotes"), "--data",
        str(out / "quotes" / "heldout.jsonl"), "--json", "--max-length", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tuned = [r for r in json.loads(proc.stdout) if r["adapter"] == "quotes"]
    assert tuned and tuned[0]["loss"] == pytest.approx(summary[1]["heldout_loss_after"], abs=1e-5)
    # A second run into the same folder refuses to replace the task adapters.
    again = cli_main(
        "train", "--model", str(tiny_model_dir), "--task", f"quotes={quotes}",
        "--output", str(out),
    )  # fmt: skip
    assert_user_error(again, "already exists", "--overwrite")


@pytest.mark.parametrize(
    ("tasks", "extra", "needle"),
    [
        (["a=examples:quotes", "a=examples:role-prompts"], [], "given twice"),
        (["a=examples:quotes:nofield"], [], "no field 'nofield'"),
        (["examples:quotes"], [], "NAME=DATA"),
        (["../up=examples:quotes"], [], "cannot be a folder name"),
        (["a=examples:quotes"], ["--data", "examples:quotes"], "not both"),
        (["a=examples:quotes"], ["--eval-data", "examples:quotes:heldout"], "--eval-data"),
        ([], [], "give --data"),
    ],
)
def test_bad_tasks_are_refused_before_any_model_loads(tmp_path, cli_main, tasks, extra, needle):
    args = [arg for task in tasks for arg in ("--task", task)]
    proc = cli_main(
        "train", "--model", str(tmp_path / "no-model-here"), *args, *extra,
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert_user_error(proc, needle)
    assert not (tmp_path / "out").exists()
