"""Task metrics: rank classification against a one-row-at-a-time reference, exact match, and
``softprompt eval --metric`` as a user runs it."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from softprompt.adapters import Adapter
from softprompt.data import Example
from softprompt.engine import SamplingParams
from softprompt.errors import UserError
from softprompt.generation import Request, generate
from softprompt.insight.scoring import choice_accuracy, choice_scores, exact_match

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


def test_labels_that_begin_alike_are_scored_with_the_end_of_the_answer(spm):
    # "be" is a token-prefix of "be kind": scored as its own tokens alone, "be" never scores
    # below "be kind", so "be kind" could never be chosen, whatever the prompt learnt. With
    # labels that begin alike every candidate is scored with the end of the answer (EOS), as
    # training scores it (on the embedded model: docs/benchmarks/tasks.md, generated families).
    labels = ["be", "be kind"]
    prompts = [" ".join(p) for p in itertools.permutations(PROMPTS[:4], 2)]
    rows = [Example(completion=labels[i % 2], prompt=p) for i, p in enumerate(prompts)]
    scores = choice_scores(spm, rows, [None], "prefixes", choices=labels)
    eos = spm.tokenizer.eos_token
    got = scores.loglik[0].tolist()
    want = [_loglik(spm, None, row.prompt, c + eos) for row in rows for c in labels]
    assert got == pytest.approx(want, abs=1e-4)
    # Labels that do not begin alike are scored by their own tokens alone, as before.
    rows = _rows()
    plain = choice_scores(spm, rows, [None], "words", choices=LABELS).loglik[0].tolist()
    assert plain == pytest.approx(
        [_loglik(spm, None, row.prompt, c) for row in rows for c in LABELS], abs=1e-4
    )


def test_a_prompt_ensemble_picks_by_the_log_likelihoods_summed_over_its_prompts(spm):
    # Lester et al. 2021, section 7: several prompts scored together. Each candidate's score
    # is its log-likelihood summed over the prompts, each computed as one unpadded row alone.
    for seed, name in enumerate(("a", "b", "c")):
        rows = torch.randn(2 + seed, spm.hidden_size, generator=torch.Generator().manual_seed(seed))
        spm.add_adapter(Adapter(name, rows * 3))
    rows = _rows()
    result = choice_accuracy(spm, rows, ["a", "b", "c"], "words", batch_size=7)
    picks = []
    for row in rows:
        scores = [sum(_loglik(spm, m, row.prompt, c) for m in "abc") for c in LABELS]
        picks.append(LABELS[max(range(4), key=scores.__getitem__)])
    hits = sum(p == r.completion for p, r in zip(picks, rows, strict=True))
    assert result.accuracy == pytest.approx(hits / len(rows))
    assert result.adapter == "ensemble(a, b, c)"
    chosen = {label: sum(m.get(label, 0) for m in result.labels.values()) for label in LABELS}
    assert chosen == {label: picks.count(label) for label in LABELS}
    # one member is that prompt alone
    alone = choice_accuracy(spm, rows, ["a"], "words")
    assert alone.accuracy == choice_accuracy(spm, rows, "a", "words").accuracy


def test_choice_scores_score_any_group_of_prompts_as_choice_accuracy_does(spm):
    # One pass over the model per prompt; every ensemble of them is then a sum (the benchmark's
    # ensembles of seeds): each group picks as choice_accuracy given that group.
    from itertools import combinations

    from softprompt.insight.scoring import choice_scores

    for seed, name in enumerate(("a", "b", "c")):
        rows = torch.randn(2 + seed, spm.hidden_size, generator=torch.Generator().manual_seed(seed))
        spm.add_adapter(Adapter(name, rows * 3))
    rows = _rows()
    scores = choice_scores(spm, rows, ["a", "b", "c", None], "words", batch_size=5)
    assert scores.loglik.shape == (4, len(rows) * len(LABELS))
    groups = [list(g) for k in (1, 2, 3) for g in combinations(range(3), k)]
    for group in groups:
        names = ["abc"[i] for i in group]
        expected = choice_accuracy(spm, rows, names, "words")
        assert scores.accuracy(group) == pytest.approx(expected.accuracy)
        assert scores.accuracy(group, norm=True) == pytest.approx(expected.accuracy_norm)
    # each entry is that candidate's log-likelihood under that prompt, the prompts differ
    for m, name in enumerate("abc"):
        for r in (0, len(rows) - 1):
            at = r * len(LABELS) + 1
            candidate = scores.options[r][1]
            assert scores.loglik[m, at] == pytest.approx(
                _loglik(spm, name, rows[r].prompt, candidate), abs=1e-3
            )
    assert not torch.allclose(scores.loglik[0], scores.loglik[1])
    base = choice_accuracy(spm, rows, None, "words")
    assert scores.accuracy([3]) == pytest.approx(base.accuracy)
    with pytest.raises(UserError, match="at least one adapter"):
        choice_scores(spm, rows, [], "words")


def test_eval_ensemble_adds_the_ensembles_row_after_its_members(
    spm, tiny_model_dir, tmp_path, cli_main
):
    from softprompt.adapters import adapter_config, write_adapter_files

    folders = []
    for seed, name in enumerate(("p1", "p2")):
        weights = torch.randn(3, spm.hidden_size, generator=torch.Generator().manual_seed(seed))
        folder = tmp_path / name
        folder.mkdir()
        write_adapter_files(folder, weights, adapter_config(Adapter(name, weights), "tiny"))
        folders.append(folder)
    data = tmp_path / "rows.jsonl"
    write_jsonl(data, _rows())
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--metric", "choice"]
    adapters = [arg for f in folders for arg in ("--adapter", str(f))]
    done = cli_main(*base, *adapters, "--ensemble", "--json")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["adapter"] for r in records] == [None, "p1", "p2", "ensemble(p1, p2)"]
    # each member's figures and the ensemble's are the library's, each group scored alone
    from softprompt.adapters import load_adapter

    for folder in folders:
        spm.add_adapter(load_adapter(folder))
    for record, group in zip(records, [None, "p1", "p2", ["p1", "p2"]], strict=True):
        expected = choice_accuracy(spm, _rows(), group, str(data))
        assert record["accuracy"] == pytest.approx(expected.accuracy)
        assert record["accuracy_norm"] == pytest.approx(expected.accuracy_norm)
        assert record["labels"] == expected.labels
    refused = cli_main(*base, "--adapter", str(folders[0]), "--ensemble")
    assert refused.returncode == 2 and "two or more --adapter" in refused.stderr


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
    assert refused.returncode == 2 and "need prompt/completion or chat data" in refused.stderr


def test_label_init_starts_from_the_labels_own_rows(spm):
    from softprompt.tuning.init import init_prompt

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
    write_jsonl(data, _rows() * 3)
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
    from softprompt.insight.scoring import in_context, pick_shots

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
    write_jsonl(data, _rows())
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


# A template with an end-of-turn token (the tiny tokenizer's EOS) after every turn.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
CHATS = [
    (("user", "i want you to act as a poet"), ("assistant", "the river")),
    (("system", "be kind"), ("user", "hope is"), ("assistant", "mountain")),
    (("user", "be brave"), ("assistant", "courage and hope"), ("user", "and ?"),
     ("assistant", "small steps up")),
]  # fmt: skip


def _chat_loglik(spm, adapter, messages, candidate: str) -> float:
    """log p(candidate | virtual tokens, conversation in the template), one unpadded row."""
    from softprompt.layout import chat_layout

    prompt = chat_layout(spm.tokenizer, messages, add_generation_prompt=True).ids
    cand = spm.tokenizer(candidate, add_special_tokens=False)["input_ids"]
    ids = spm.virtual_ids(adapter) + prompt + cand
    with torch.no_grad():
        logits = spm.forward(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(ids) - len(cand)
    return sum(float(logits[start + j - 1, t]) for j, t in enumerate(cand))


def test_a_conversation_is_judged_on_its_last_assistant_turn():
    from softprompt.insight.scoring import in_context, task_rows

    rows = task_rows([Example(messages=c) for c in CHATS])
    assert [r.completion for r in rows] == ["the river", "mountain", "small steps up"]
    assert rows[2].messages == CHATS[2][:3] and rows[0].messages == CHATS[0][:1]
    # Baselines for chat: the instruction as a system message, the shots as earlier turns.
    (framed,) = in_context(rows[1:2], rows[:1], "be brave")
    assert framed.messages == (("system", "be brave"), *CHATS[0], *CHATS[1][:2])
    assert framed.completion == "mountain"
    with pytest.raises(UserError, match="prompt/completion or chat"):
        task_rows([Example(completion="just text")])


@pytest.mark.parametrize("adapter", [None, "a"])
def test_choice_on_chat_ranks_the_last_turn_after_the_template(spm, adapter):
    spm.tokenizer.chat_template = TEMPLATE
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size) * 3))
    examples = [Example(messages=c) for c in CHATS]
    labels = ["the river", "mountain", "small steps up"]
    result = choice_accuracy(spm, examples, adapter, "chats", batch_size=4)
    hits = 0
    for chat in CHATS:
        scores = [_chat_loglik(spm, adapter, chat[:-1], c) for c in labels]
        hits += labels[max(range(3), key=scores.__getitem__)] == chat[-1][1]
    assert result.accuracy == pytest.approx(hits / 3) and set(result.labels) == set(labels)


def test_per_row_choices_rank_each_row_among_its_own(spm):
    rows = [
        Example(completion="mountain", prompt="hope is", choices=("mountain", "the river")),
        Example(completion="be kind", prompt="every day", choices=("hope", "light", "be kind")),
    ]
    result = choice_accuracy(spm, rows, None, "own")
    hits = 0
    for row in rows:
        scores = [_loglik(spm, None, row.prompt, c) for c in row.choices]
        hits += row.choices[max(range(len(row.choices)), key=scores.__getitem__)] == row.completion
    assert result.accuracy == pytest.approx(hits / 2)
    assert result.labels == {}  # no shared labels, so no confusion matrix
    bad = [Example(completion="courage", prompt="hope is", choices=("mountain", "the river"))]
    with pytest.raises(UserError, match="row 1's candidates"):
        choice_accuracy(spm, bad, None, "own")


def test_pattern_counts_the_greedy_chat_replies_that_match(spm):
    import re

    from softprompt.generation import engine_for
    from softprompt.insight.scoring import pattern_match
    from softprompt.layout import chat_layout

    spm.tokenizer.chat_template = TEMPLATE
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size) * 4))
    examples = [Example(messages=c) for c in CHATS]
    prompts = [chat_layout(spm.tokenizer, c[:-1], add_generation_prompt=True).ids for c in CHATS]
    params = SamplingParams(max_new_tokens=6)
    own = [c.text for c in engine_for(spm).generate(prompts, ["a"] * 3, params)]
    pattern = "^" + re.escape(own[0][:4])
    expected = sum(re.search(pattern, o) is not None for o in own) / 3
    result = pattern_match(spm, examples, "a", pattern, "chats", max_new_tokens=6)
    assert result.accuracy == pytest.approx(expected) and result.accuracy > 0
    assert len(result.misses) == round((1 - expected) * 3)
    nothing = pattern_match(spm, examples, "a", "^no such reply$", "chats", max_new_tokens=6)
    assert nothing.accuracy == 0 and len(nothing.misses) == 3


def test_eval_on_chat_data_from_the_cli(tiny_model_dir, tmp_path: Path, cli_main):
    from transformers import AutoTokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(Example(messages=c).as_json()) + "\n" for c in CHATS))
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(
            json.dumps(Example(messages=(("user", w), ("assistant", "hope"))).as_json()) + "\n"
            for w in "river light teacher chef".split()
        )
    )
    done = cli_main(
        "eval", "--model", str(model), "--data", str(data), "--metric", "pattern",
        "--pattern", "^hope", "--metric", "loss", "--few-shot", "2", "--shots-from", str(pool),
        "--instruction", "be kind", "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [(r["metric"], r["context"]) for r in records] == [
        ("loss", None), ("loss", "instruction"), ("loss", "2-shot"),
        ("pattern", None), ("pattern", "instruction"), ("pattern", "2-shot"),
    ]  # fmt: skip
    assert all(r["n"] == 3 for r in records)
    for args, message in [
        (["--metric", "pattern"], "needs --pattern"),
        (["--metric", "pattern", "--pattern", "(unclosed"], "not a regular expression"),
        (["--pattern", "x"], "--pattern is for --metric pattern"),
        (["--few-shot", "1", "--shots-from", str(tmp_path / "texts.jsonl")], "shots must be"),
    ]:
        (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "hope"}) + "\n")
        refused = cli_main("eval", "--model", str(model), "--data", str(data), *args)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_report_has_a_task_section_with_confusion_heatmaps(
    tiny_model_dir, tmp_path: Path, cli_main, render_page
):
    data = tmp_path / "labels.jsonl"
    write_jsonl(data, _rows())
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(json.dumps({"prompt": f"the {w}", "completion": LABELS[i]}) + "\n"
                for i, w in enumerate(["river", "light", "hope", "poet"]))
    )  # fmt: skip
    out = tmp_path / "labeller"
    done = cli_main(
        "train", "--model", str(tiny_model_dir), "--data", str(pool), "--eval-data", str(data),
        "--epochs", "1", "--virtual-tokens", "3", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = tmp_path / "report.html"
    refused = cli_main(
        "report", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", str(data),
        "--metric", "choice", "--few-shot", "2", "--shots-from", str(data), "--output", str(page),
    )  # fmt: skip
    assert refused.returncode == 2 and "that are not evaluated rows; it has 0" in refused.stderr
    done = cli_main(
        "report", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", str(data),
        "--metric", "choice", "--metric", "exact", "--few-shot", "2",
        "--max-new-tokens", "3", "--output", str(page),
    )  # fmt: skip
    # No --shots-from: the shots come from the data the adapter was trained on, since it
    # records --data as its held-out data.
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert "<h2>Task accuracy (higher is better)</h2>" in html
    for model in ("base model", "base model (2-shot)", "labeller"):
        assert f"<tr><th>{model}</th>" in html
    # a confusion heatmap per choice run (3), the loss heatmap and the loss curve
    assert html.count('alt="confusion matrix"') == 3
    facts = render_page(page, tmp_path / "report.png")
    assert facts["headings"][:2] == ["Knowledge preservation", "Task accuracy (higher is better)"]
    assert len(facts["images"]) == 5
    assert all(loaded and width > 200 for loaded, width, _ in facts["images"])
    refused = cli_main(
        "report", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", str(data),
        "--few-shot", "2", "--output", str(tmp_path / "r2.html"),
    )  # fmt: skip
    assert refused.returncode == 2 and "give one" in refused.stderr
    assert not (tmp_path / "r2.html").exists()
