"""A run that chooses its method and learning rate on the user's data (``--search``)."""

from __future__ import annotations

import json

from conftest import write_jsonl
from softprompt.data import Example
from softprompt.tuning import run as run_module
from softprompt.tuning import train as train_module
from softprompt.tuning.config import TrainConfig
from softprompt.tuning.search import (
    CANDIDATES,
    MIN_SEARCH_ROWS,
    Candidate,
    candidates,
    search_split,
)

LABELS = [" hope", " courage", " light"]
WORDS = "be kind brave every day small steps the mountain river help me two nice things".split()


def _classified(count: int, seed: int = 0) -> list[Example]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % len(LABELS)
        words = [WORDS[(label * 5 + rng.randrange(5)) % len(WORDS)] for _ in range(3)]
        rows.append(Example(prompt=" ".join(words) + " :", completion=LABELS[label]))
    return rows


def test_the_search_part_holds_every_label_and_at_least_its_floor_of_rows():
    from softprompt.tuning.judge import Judge

    rows = _classified(90)
    judge = Judge("choice", labels=tuple(LABELS))
    kept, held = search_split(rows, judge, seed=0)
    assert len(kept) + len(held) == len(rows)
    assert len(held) >= MIN_SEARCH_ROWS
    assert {r.completion for r in held} == {r.completion for r in kept} == set(LABELS)
    # each label's share held out is the same, give or take a row
    shares = [sum(r.completion == label for r in held) for label in LABELS]
    assert max(shares) - min(shares) <= 1
    # a small set: at most half of it is held out of the trials
    kept, held = search_split(rows[:40], judge, seed=0)
    assert len(held) <= 20 and len(kept) >= 20
    # the same seed, the same split; another seed, another
    assert search_split(rows, judge, 0) == search_split(rows, judge, 0)
    assert search_split(rows, judge, 0)[1] != search_split(rows, judge, 1)[1]


def test_the_candidates_are_what_the_user_left_open():
    task = ["completion"]
    assert candidates(TrainConfig(), task, None) == list(CANDIDATES)
    prefix = candidates(TrainConfig(method="prefix"), task, None)
    assert prefix and all(c.method == "prefix" for c in prefix)
    pinned_lr = candidates(TrainConfig(lr=0.02), task, None)
    assert {c.lr for c in pinned_lr} == {0.02} and {c.method for c in pinned_lr} == {
        "prefix",
        "prompt",
    }
    assert candidates(TrainConfig(method="prefix", lr=0.02), task, None) == []
    assert all(c.method == "prompt" for c in candidates(TrainConfig(), task, "prompt"))
    assert candidates(TrainConfig(), ["text"], None) == []
    plain = candidates(TrainConfig(reparam="none"), task, None)
    assert Candidate("prompt", 3e-2, "none") in plain


def test_a_run_searches_on_its_data_and_trains_the_winner(tiny_model_dir, tmp_path, cli_main):
    data = write_jsonl(tmp_path / "train.jsonl", _classified(80))
    out = tmp_path / "adapter"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]
    run = cli_main(*args, "--virtual-tokens", "4", "--epochs", "3", "--batch-size", "4", "--search")
    assert run.returncode == 0, run.stderr
    assert "chosen on the data by a search over 4 candidates" in run.stdout
    # The progress bar says which trial runs.
    assert "search: trial 1/4, prefix lr 0.01" in run.stderr
    assert "search: trial 4/4, prompt+residual lr 0.1" in run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("search: "))
    record = json.loads((out / "training_config.json").read_text())
    search = record["search"]
    won = [t for t in search["trials"] if t["won"]]
    assert len(won) == 1 and line.startswith(f"search: {search['winner']} (")
    # The run trained the winner's settings.
    assert (record["method"], record["lr"]) == (won[0]["method"], won[0]["lr"])
    if won[0]["method"] == "prompt":
        assert record["reparam"] == won[0]["reparam"]
    # Successive halving: the better half by loss went on; the last two were scored by the
    # task's metric too, and the winner is the better by what the record says decided.
    first = sorted(search["trials"], key=lambda t: t["rounds"][0]["loss"])
    assert [len(t["rounds"]) for t in first] == [2, 2, 1, 1]
    finalists = [t["rounds"][-1] for t in first[:2]]
    assert all(r["metric"] is not None for r in finalists)
    other = next(r for r in finalists if r != won[0]["rounds"][-1])
    if search["judged_by"].startswith("metric: "):
        assert won[0]["rounds"][-1]["metric"] > other["metric"]
    else:
        assert search["judged_by"].startswith("loss: the metric told them apart by ")
        assert won[0]["rounds"][-1]["loss"] <= other["loss"]
    assert f"won, by {search['judged_by']}; on " in line
    # The trials' steps together are at most the run's own: 80 rows, 8 held out, 3 epochs.
    run_steps = 3 * -(-72 // 4)
    assert sum(t["rounds"][-1]["steps"] for t in search["trials"]) <= run_steps
    assert search["search_rows"] >= MIN_SEARCH_ROWS and search["trial_rows"] >= 30


def test_no_search_when_pinned_or_asked_not_to(tiny_model_dir, tmp_path, cli_main):
    data = write_jsonl(tmp_path / "train.jsonl", _classified(40))
    base = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--epochs", "1"]
    run = cli_main(*base, "--output", str(tmp_path / "a"), "--no-search")
    assert run.returncode == 0, run.stderr
    assert "search: " not in run.stdout and "by a search" not in run.stdout
    record = json.loads((tmp_path / "a" / "training_config.json").read_text())
    assert record["search"] == {"ran": False, "why": "--no-search"}
    assert record["method"] == "prefix"
    # Everything pinned: --search has nothing to choose, said in one line before any work.
    run = cli_main(
        *base, "--output", str(tmp_path / "b"), "--search", "--method", "prefix", "--lr", "0.01"
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "--search cannot run: nothing left open" in run.stderr
    assert not (tmp_path / "b").exists()
    # ... refused before any model loads (this one does not exist)
    pinned = ["--search", "--method", "prefix", "--lr", "0.01"]
    run = cli_main(*base, "--output", str(tmp_path / "b"), *pinned, "--model", "no/such-model")
    assert run.returncode == 2 and "--search cannot run" in run.stderr
    # Not asked for: no search, and the record says so.
    run = cli_main(*base, "--output", str(tmp_path / "c"))
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "c" / "training_config.json").read_text())
    assert record["search"] == {"ran": False, "why": "not asked for (--search)"}
    # Too few rows to search on: refused in one line.
    few = write_jsonl(tmp_path / "few.jsonl", _classified(12))
    run = cli_main(*base[:4], str(few), "--output", str(tmp_path / "d"), "--search")
    assert run.returncode == 2 and "fewer than 20 training rows" in run.stderr


def test_a_resumed_run_keeps_the_choice_of_its_search(
    tiny_model_dir, tmp_path, cli_main, monkeypatch
):
    data = write_jsonl(tmp_path / "train.jsonl", _classified(60))
    out = tmp_path / "adapter"
    args = [
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
        "--virtual-tokens", "4", "--epochs", "2", "--batch-size", "4", "--checkpoint-every", "2",
        "--search",
    ]  # fmt: skip
    real_search, real_losses = run_module.run_search, train_module.task_losses
    calls: list[int] = []

    def dies_in_training(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_losses(*a, **k)

    def search_then_die(*a, **k):
        found = real_search(*a, **k)
        monkeypatch.setattr(train_module, "task_losses", dies_in_training)
        return found

    monkeypatch.setattr(run_module, "run_search", search_then_die)
    stopped = cli_main(*args)
    assert stopped.returncode != 0 and "--resume" in stopped.stderr
    monkeypatch.setattr(train_module, "task_losses", real_losses)

    def no_second_search(*a, **k):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(run_module, "run_search", no_second_search)
    resumed = cli_main(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "chosen before the resume" in resumed.stdout
    record = json.loads((out / "training_config.json").read_text())
    won = next(t for t in record["search"]["trials"] if t["won"])
    assert (record["method"], record["lr"]) == (won["method"], won["lr"])


def test_a_search_leaves_no_trial_in_the_model(spm):
    from softprompt.tuning.run import _start_rows  # noqa: F401 - the run's own starting rows
    from softprompt.tuning.search import run_search

    rows = _classified(60)
    asked = TrainConfig(virtual_tokens=4, epochs=1, batch_size=8, max_length=16)
    config = asked.resolve(["completion"], fitted_length=16)

    def starts(cfg):
        from softprompt.tuning.init import init_prefix, init_prompt

        if cfg.method == "prefix":
            return [init_prefix(spm.base, 4, "vocab", None, 0)]
        return [init_prompt(spm.base, 4, "vocab", None, 0)]

    def resolve(cfg):
        return cfg.resolve(["completion"], fitted_length=16)

    result = run_search(spm, [("t", rows)], asked, config, CANDIDATES, starts, resolve, False)
    assert spm.adapters == {}
    assert result.winner in result.trials and len(result.trials) == len(CANDIDATES)


def _trial(lr: float, metric: float, loss: float, hits: list[bool]):
    from softprompt.tuning.search import Trial

    trial = Trial(Candidate("prefix", lr), None)  # type: ignore[arg-type]
    trial.rounds.append({"steps": 10, "metric": metric, "loss": loss})
    trial.hits = hits
    return trial


def test_the_last_round_is_decided_by_the_metric_only_beyond_its_noise():
    from softprompt.tuning.search import settle

    # One row of 31 apart by the metric, the loss the other way: the loss decides (the metric's
    # difference is what a reshuffle of the search part could give).
    rows = 31
    a = _trial(0.01, 10 / rows, 0.67, [True] * 10 + [False] * 21)
    b = _trial(0.03, 9 / rows, 0.57, [True] * 9 + [False] * 22)
    winner, why = settle(a, b)
    assert winner is b
    assert why.startswith("loss") and "1 of 31" in why
    # Many rows right with one alone: the metric decides, against the loss.
    c = _trial(0.03, 20 / rows, 0.70, [True] * 20 + [False] * 11)
    winner, why = settle(a, c)
    assert winner is c
    assert why.startswith("metric") and "10 rows" in why
    # Same either way round.
    assert settle(b, a)[0] is b and settle(c, a)[0] is c
