"""Data formats (text, prompt/completion, chat messages) and the tokens the loss covers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from softprompt.adapters import Adapter
from softprompt.data import Example, Fields, load_texts
from softprompt.errors import UserError
from softprompt.layout import chat_layout, example_layout
from softprompt.rows import batch_loss, training_rows

# A template with an end-of-turn token (the tiny tokenizer's EOS) after every turn.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
CHAT = [
    ("system", "be kind"),
    ("user", "i want you to act as a poet"),
    ("assistant", "hope is a light"),
    ("user", "and the river ?"),
    ("assistant", "the river and the mountain"),
]


def _chat_rows(conversation=CHAT) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in conversation]}


def test_each_format_is_detected_and_read(tmp_path):
    text = load_texts(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "be kind"}])))
    assert text.format == "text" and text.texts == ["be kind"]
    pairs = [{"prompt": "i want", "completion": "hope"}, {"prompt": "be", "completion": "kind"}]
    pc = load_texts(str(write_jsonl(tmp_path / "pc.jsonl", pairs)))
    assert pc.format == "completion" and pc.examples[1] == Example(completion="kind", prompt="be")
    chat = load_texts(str(write_jsonl(tmp_path / "c.jsonl", [_chat_rows()])))
    assert chat.format == "chat" and chat.examples[0].messages == tuple(CHAT)
    renamed = [{"q": "i want", "a": "hope"}]
    other = load_texts(
        str(write_jsonl(tmp_path / "r.jsonl", renamed)), fields=Fields(prompt="q", completion="a")
    )
    assert other.examples == [Example(completion="hope", prompt="i want")]
    assert load_texts("examples:role-prompts").format == "text"  # its field is named "prompt"


@pytest.mark.parametrize(
    "rows, fields, message",
    [
        ([{"prompt": "a", "completion": "b"}, {"text": "c"}], None, "keep to one format"),
        ([_chat_rows(), {"text": "c"}], None, "keep to one format"),
        ([_chat_rows(CHAT[:2])], None, "no assistant turn"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], None, "needs a role"),
        ([{"prompt": "a", "completion": " "}], None, "empty completion"),
        ([{"text": "a"}], Fields(messages="chat"), "--messages-field"),
        ([{"text": "a"}], Fields(prompt="q"), "--prompt-field"),
    ],
)
def test_bad_datasets_are_refused_in_one_line(tmp_path, rows, fields, message):
    with pytest.raises(UserError, match=message) as caught:
        load_texts(str(write_jsonl(tmp_path / "bad.jsonl", rows)), fields=fields)
    assert "\n" not in str(caught.value)


def test_a_completion_is_scored_and_its_prompt_is_not(spm):
    tok = spm.tokenizer
    example = Example(completion="hope is a light", prompt="i want you to act as a poet")
    layout = example_layout(tok, example, 64)
    prompt = tok("i want you to act as a poet")["input_ids"]
    completion = tok("hope is a light", add_special_tokens=False)["input_ids"]
    assert layout.ids == prompt + completion + [tok.eos_token_id]
    assert layout.scored == [False] * len(prompt) + [True] * (len(completion) + 1)
    # Too long: the prompt loses its start first; the completion and its EOS stay whole.
    short = example_layout(tok, example, len(completion) + 3)
    assert short.ids == prompt[-2:] + completion + [tok.eos_token_id] and not short.cut
    # Even the completion does not fit: cut at its end, without its EOS.
    cut = example_layout(tok, example, 2)
    assert cut.ids == completion[:2] and cut.scored == [True, True] and cut.cut
    # A plain text is a completion with no prompt: every token scored, as before.
    plain = example_layout(tok, Example(completion="be kind"), 64)
    assert plain.ids == tok("be kind")["input_ids"] + [tok.eos_token_id] and all(plain.scored)


def test_chat_scores_the_assistant_turns_and_serving_sees_the_trained_layout(spm):
    tok = spm.tokenizer
    tok.chat_template = TEMPLATE
    layout = chat_layout(tok, CHAT)
    scored = [i for i, s in zip(layout.ids, layout.scored, strict=True) if s]
    assert tok.decode(scored) == tok.decode(
        tok("hope is a light <eos> the river and the mountain <eos>", add_special_tokens=False)[
            "input_ids"
        ]
    )
    whole = tok(tok.apply_chat_template([dict(role=r, content=c) for r, c in CHAT], tokenize=False))
    assert tok.decode(layout.ids) == tok.decode(whole["input_ids"])
    # What the chat endpoint sends for the conversation up to each assistant turn is, token for
    # token, the trained layout up to that turn.
    for turn in (2, 4):
        served = chat_layout(tok, CHAT[:turn], add_generation_prompt=True).ids
        first = layout.scored.index(True) if turn == 2 else _second_turn(layout.scored)
        assert served == layout.ids[:first]


def _second_turn(scored: list[bool]) -> int:
    starts = [i for i in range(1, len(scored)) if scored[i] and not scored[i - 1]]
    return starts[1]


def test_the_loss_covers_the_scored_tokens_only(spm):
    torch.manual_seed(0)
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size)))
    examples = [
        Example(completion="hope is a light", prompt="i want you to act as a poet"),
        Example(completion="be kind every day", prompt="the mountain"),
    ]
    rows, _ = training_rows(spm, examples, "a", 64)
    total, count = batch_loss(spm, rows, skip_first=False)
    expected, tokens = 0.0, 0
    with torch.no_grad():
        for ids, _, scored in rows:
            logits = spm.forward(torch.tensor([ids])).logits[0]
            for j, keep in enumerate(scored):
                position = 3 + j  # text token j sits after the 3 virtual tokens
                if keep:
                    expected += float(
                        F.cross_entropy(logits[position - 1], torch.tensor(ids[position]))
                    )
                    tokens += 1
    assert count == tokens == sum(sum(r[2]) for r in rows)
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_heldout_fraction_sets_how_much_of_the_data_is_held_out(tiny_model_dir, tmp_path, cli_main):
    # The share of --data held out (to evaluate and to choose the rows kept) is a flag, so a
    # user (and the task suite) can hold out more than the default 10%.
    rows = [{"prompt": f"say {w}", "completion": f"{w} now"} for w in "abcdefghijklmnopqrst"]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "adapter"
    done = cli_main(
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
        "--epochs", "1", "--virtual-tokens", "2", "--heldout-fraction", "0.25",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    held = (out / "heldout.jsonl").read_text().splitlines()
    assert len(held) == 5
    assert "held out: 5 of" in done.stdout
    for bad in ("0", "1", "-0.2", "nan"):
        refused = cli_main(
            "train", "--model", str(tiny_model_dir), "--data", str(data), "--output",
            str(tmp_path / f"bad{bad}"), "--heldout-fraction", bad,
        )  # fmt: skip
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            "softprompt: error: --heldout-fraction must be above 0 and below 1"
        ), refused.stderr
        assert not (tmp_path / f"bad{bad}").exists()


def test_train_on_prompt_completion_data_says_what_it_scores(tiny_model_dir, tmp_path, cli_main):
    words = "be kind every day small steps hope courage river mountain light".split()
    rows = [
        {"prompt": f"i want you to act as a {w}", "completion": f"{w} and {words[i % 5]}"}
        for i, w in enumerate(words * 3)
    ]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "adapter"
    done = cli_main(
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
        "--epochs", "1", "--virtual-tokens", "2", "--no-search",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "prompt/completion examples" in done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("scoring"))
    scored, total = (
        int(n.replace(",", "")) for n in line.split(": ")[1].split(" tokens")[0].split(" of ")
    )
    assert 0 < scored < total
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert held and all(set(r) == {"prompt", "completion"} for r in held)
    config = json.loads((out / "training_config.json").read_text())
    assert config["data_format"] == "completion"
    # Without a search, task data is prefix-tuned (the task suite's choice), said before training.
    assert config["method"] == "prefix" and config["reparam"] == "none"
    assert "method: prefix tuning (the default for prompt/completion" in done.stdout
    assert config["lr"] == 0.03
    assert "learning rate: 0.03 (the default of prefix tuning on prompt/completion" in done.stdout
    assert config["weight_decay"] == 0.0 and config["group_by_length"] is True
    # Prompt tuning on task data trains through a residual MLP, decays its rows and shuffles
    # its batches by default (each measured best on task data).
    prompt = cli_main(
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output",
        str(tmp_path / "prompt"), "--epochs", "1", "--virtual-tokens", "2", "--method", "prompt",
        "--search",
    )  # fmt: skip
    assert prompt.returncode == 0, prompt.stderr
    assert "method: prompt tuning through a residual MLP" in prompt.stdout
    # The method given, the search chooses among its learning rates.
    assert "learning rate: chosen on the data by a search over 2 candidates" in prompt.stdout
    prompt_config = json.loads((tmp_path / "prompt" / "training_config.json").read_text())
    assert prompt_config["weight_decay"] == 0.01 and prompt_config["group_by_length"] is False
    assert prompt_config["reparam"] == "residual"
    evaluated = cli_main(
        "eval", "--model", str(tiny_model_dir), "--adapter", str(out),
        "--data", str(out / "heldout.jsonl"), "--json",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads(evaluated.stdout)
    assert {r["adapter"] for r in results} == {None, "adapter"}


def test_generate_chat_sends_the_trained_chat_layout(spm, tiny_model_dir, cli_main):
    from softprompt.engine import SamplingParams
    from softprompt.generation import Request, engine_for, generate

    spm.tokenizer.chat_template = TEMPLATE
    spm.add_adapter(Adapter("a", torch.randn(3, spm.hidden_size) * 4))
    params = SamplingParams(max_new_tokens=8)
    chat = generate(spm, [Request("hope is", "a", chat=True)], params)
    ids = chat_layout(spm.tokenizer, [("user", "hope is")], add_generation_prompt=True).ids
    direct = engine_for(spm).generate([ids], ["a"], params)[0].text
    assert chat == [direct] and chat != generate(spm, [Request("hope is", "a")], params)
    # The tiny model's own folder has no chat template: one line.
    done = cli_main("generate", "--model", str(tiny_model_dir), "--prompt", "hope", "--chat")
    assert done.returncode == 2 and "no chat template" in done.stderr
