from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from conftest import with_chat_template, write_jsonl
from softprompt.adapters import Adapter, load_adapter
from softprompt.errors import UserError
from softprompt.insight.evaluate import evaluate
from softprompt.tuning.config import TASK_PREFIX_LR
from softprompt.tuning.init import init_prompt
from softprompt.tuning.save import save_trained
from softprompt.tuning.train import TrainConfig, train, trainable_summary

TEXTS = [
    "be kind every day",
    "be brave every day",
    "be kind and brave every day",
    "small steps every day",
    "hope every day",
    "courage every day",
] * 3


def _train(spm, **overrides):
    config = TrainConfig(
        **{"virtual_tokens": 4, "epochs": 4, "lr": 0.1, "batch_size": 4, **overrides}
    )
    start = init_prompt(spm.base, config.virtual_tokens, config.init, config.init_text)
    return config, train(spm, "tuned", start, TEXTS, TEXTS[:4], config, progress=False)


def test_training_lowers_loss_and_leaves_base_untouched(spm):
    before = spm.base_checksum()
    config, result = _train(spm)
    assert spm.base_checksum() == before
    assert len(result.evals) == config.epochs + 1
    assert result.loss_after < result.loss_before - 0.1
    assert result.trainable_params == 4 * spm.hidden_size
    assert not spm.adapter_weights("tuned").requires_grad


def test_trainable_summary_format():
    assert trainable_summary(2304, 134517312) == (
        "trainable params: 2,304 || all params: 134,517,312 || trainable%: 0.0017"
    )


def test_saved_adapter_reloads_with_same_loss(spm, tmp_path):
    config, result = _train(spm)
    folder = save_trained(spm, "tuned", tmp_path / "out", config, result, {"data": "x"})
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "loss_log.json",
        "training_config.json",
    ]
    log = json.loads((folder / "loss_log.json").read_text())
    assert [e["epoch"] for e in log["evals"]] == list(range(config.epochs + 1))
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # No temporary folder is left beside the output.
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    adapter = load_adapter(folder, name="again")
    spm.add_adapter(adapter)
    ours = evaluate(spm, TEXTS, "tuned").loss
    assert evaluate(spm, TEXTS, "again").loss == pytest.approx(ours, abs=1e-6)


def test_existing_output_is_not_overwritten(spm, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))  # where rescues go
    config, result = _train(spm, epochs=1)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        save_trained(spm, "tuned", target, config, result)
    assert (target / "keep.txt").read_text() == "mine"


def test_failed_save_leaves_nothing(spm, tmp_path, monkeypatch):
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(cache))
    config, result = _train(spm, epochs=1)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("softprompt.tuning.save.write_model_card", broken)
    with pytest.raises(RuntimeError):
        save_trained(spm, "tuned", tmp_path / "out", config, result)
    assert list(tmp_path.iterdir()) == []
    # Even a bug while saving does not throw the trained prompt away.
    (rescued,) = (cache / "rescued").iterdir()
    assert torch.equal(load_adapter(rescued).weights, spm.adapter_weights("tuned"))


def test_two_adapters_share_one_base(spm):
    _train(spm)
    start = init_prompt(spm.base, 3, "random")
    train(
        spm,
        "second",
        start,
        TEXTS[:6],
        TEXTS[:2],
        TrainConfig(virtual_tokens=3, epochs=1),
        progress=False,
    )
    assert spm.virtual_ids("second")[0] == spm.vocab_size + 4
    assert evaluate(spm, TEXTS, "tuned").loss != evaluate(spm, TEXTS, "second").loss


@pytest.mark.parametrize(
    "kwargs",
    [
        {"virtual_tokens": 0},
        {"init": "zeros"},
        {"init": "text"},
        {"init": "file"},
        {"epochs": 0},
        {"lr": 0},
        {"weight_decay": -0.1},
        {"weight_decay": 1.0},
        {"batch_size": 0},
        {"max_length": 1},
    ],
)
def test_bad_training_options(kwargs):
    with pytest.raises(UserError):
        TrainConfig(**kwargs)


def test_prompt_rows_are_the_only_gradient(spm):
    _train(spm, epochs=1)
    param = spm.adapters["tuned"].weights
    assert param.grad is not None and float(param.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in spm.model.parameters())


def test_base_model_is_left_exactly_as_it_was(tiny_model_dir):
    """Module tree, state_dict keys and values, and the input embedding object are untouched
    by every softprompt call, so save_pretrained and PEFT see the caller's own model."""
    from softprompt.engine import SamplingParams
    from softprompt.generation import Request, generate
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    base = load_base_model(str(tiny_model_dir))
    modules = [(n, type(m)) for n, m in base.model.named_modules()]
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    embedding = base.model.get_input_embeddings()
    spm = SoftPromptModel(base)
    _train(spm, epochs=1)
    spm.add_adapter(Adapter("other", torch.randn(2, spm.hidden_size)))
    generate(spm, [Request("be kind", "tuned"), Request("be", "other")], SamplingParams(8))
    evaluate(spm, TEXTS, "tuned")
    assert [(n, type(m)) for n, m in base.model.named_modules()] == modules
    after = base.model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert base.model.get_input_embeddings() is embedding

    # PEFT applies on top of the same model, as on one softprompt never touched.
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(
        base.model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * spm.hidden_size


def test_after_training_every_reader_sees_the_trained_rows(spm):
    from softprompt.insight.inspection import inspect_adapter

    config = TrainConfig(virtual_tokens=4, epochs=2, lr=0.1, batch_size=4)
    start = init_prompt(spm.base, 4, "vocab")
    train(spm, "tuned", start.clone(), TEXTS, TEXTS[:4], config, progress=False)
    trained = spm.adapter_weights("tuned")
    assert not torch.allclose(trained, start)
    view = inspect_adapter(spm, spm.adapters["tuned"])
    assert [t.norm for t in view.tokens] == pytest.approx(trained.norm(dim=1).tolist())


@pytest.mark.parametrize("grouped", [True, False])
def test_epoch_batches_cover_every_row_once(grouped):
    import random

    from softprompt.tuning.train import epoch_batches, length_grouped_batches

    rows = [([0] * (1 + (i * 7) % 13), i) for i in range(50)]
    batches = epoch_batches(rows, 8, random.Random(3), grouped)
    assert sorted(r[1] for b in batches for r in b) == list(range(50))
    assert sorted(len(b) for b in batches) == [2] + [8] * 6  # 50 rows
    sorted_inside = all([len(r[0]) for r in b] == sorted(len(r[0]) for r in b) for b in batches)
    # Grouped: the same batches as length_grouped_batches (every one sorted by length);
    # not grouped: the shuffled order, which on these lengths leaves some batch unsorted.
    assert sorted_inside is grouped
    if grouped:
        assert batches == length_grouped_batches(rows, 8, random.Random(3))


def test_batching_and_weight_decay_are_applied_and_recorded(spm, tmp_path):
    plain = _train(spm, epochs=1)[1]
    rows = spm.adapters["tuned"].weights.detach().clone()
    spm.remove_adapter("tuned")
    config, result = _train(spm, group_by_length=False, weight_decay=0.5, epochs=1)
    assert not torch.equal(spm.adapters["tuned"].weights, rows)
    assert result.steps != plain.steps  # other batches: other losses along the way
    save_trained(spm, "tuned", tmp_path / "a", config, result)
    saved = json.loads((tmp_path / "a" / "training_config.json").read_text())
    assert saved["group_by_length"] is False and saved["weight_decay"] == 0.5


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template, as a folder the CLI can load."""
    from test_formats import TEMPLATE

    return with_chat_template(
        tiny_model_dir, tmp_path_factory.mktemp("chat-model") / "tiny", TEMPLATE
    )


ROWS = {
    "text": [{"text": t} for t in TEXTS[:8]],
    "completion": [
        {"prompt": p, "completion": c}
        for p, c in [("be kind", "every day"), ("hope is", "a light"), ("be brave", "and kind")] * 3
    ],
    "chat": [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
        for u, a in [("be kind", "every day"), ("hope is", "a light"), ("be brave", "and kind")] * 3
    ],
}


@pytest.mark.parametrize("method", ["prompt", "prefix", None])
@pytest.mark.parametrize("kind", list(ROWS))
def test_the_cli_and_the_python_api_resolve_the_same_settings(
    kind, method, chat_model_dir, tmp_path, cli_main
):
    # Settings are resolved once (TrainConfig.resolve): the same data and the same flags give
    # the same run from `softprompt train` and from `train()`, every default included.
    from softprompt.data import load_texts
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.tuning.config import RunConfig
    from softprompt.tuning.init import init_prefix

    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    write_jsonl(data, ROWS[kind])
    write_jsonl(held, ROWS[kind][:3])
    out = tmp_path / "adapter"
    asked = ["--method", method] if method else []
    done = cli_main(
        "train", "--model", str(chat_model_dir), "--data", str(data), "--eval-data", str(held),
        *asked, "--epochs", "1", "--output", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    recorded = json.loads((out / "training_config.json").read_text())
    cli = {k: recorded[k] for k in RunConfig.__dataclass_fields__}
    # No --method: prefix tuning for task data, prompt tuning for plain text.
    resolved = method or ("prompt" if kind == "text" else "prefix")
    assert cli["method"] == resolved

    spm = SoftPromptModel(load_base_model(str(chat_model_dir)))
    texts = load_texts(str(data)).examples
    held_texts = load_texts(str(held)).examples
    make = init_prompt if resolved == "prompt" else init_prefix
    start = make(spm.base, 8)  # a library caller's rows say the method when none is asked
    result = train(spm, "t", start, texts, held_texts, TrainConfig(epochs=1, method=method))
    assert result.config is not None
    assert asdict(result.config) == cli
    task_data = kind != "text" and resolved == "prompt"
    assert cli["weight_decay"] == (0.01 if task_data else 0.0)
    assert cli["group_by_length"] is (not task_data)
    assert cli["reparam"] == ("residual" if task_data else "none")
    assert cli["lr"] == (1e-2 if resolved == "prefix" and kind == "text" else 3e-2)
    assert cli["max_length"] < 64  # fitted to the data on the model, not the fallback


def test_a_python_run_plans_and_saves_as_the_cli_does(chat_model_dir, tmp_path, cli_main):
    # The orchestration lives in the library (tuning.run): a run planned and run from Python
    # reads the same held-out split, decides the same settings and writes the same adapter
    # folder as `softprompt train` given the same request.
    import softprompt
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    data = tmp_path / "train.jsonl"
    write_jsonl(data, ROWS["completion"] * 4)
    by_cli = tmp_path / "cli"
    done = cli_main(
        "train", "--model", str(chat_model_dir), "--data", str(data), "--epochs", "1",
        "--output", str(by_cli), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    by_api = tmp_path / "api"
    request = softprompt.RunRequest(
        tasks=[softprompt.TaskSource(by_api.name, str(data), by_api)],
        config=TrainConfig(epochs=1),
        output=by_api,
    )
    plan = softprompt.plan_training(
        request, lambda: SoftPromptModel(load_base_model(str(chat_model_dir)))
    )
    trained = softprompt.run_training(plan, progress=False)
    assert [t.task.output for t in trained] == [by_api]
    cli_record = json.loads((by_cli / "training_config.json").read_text())
    api_record = json.loads((by_api / "training_config.json").read_text())
    assert api_record == cli_record
    assert (by_api / "heldout.jsonl").read_text() == (by_cli / "heldout.jsonl").read_text()
    cli_log = json.loads((by_cli / "loss_log.json").read_text())
    api_log = json.loads((by_api / "loss_log.json").read_text())
    assert [e["loss"] for e in api_log["evals"]] == pytest.approx(
        [e["loss"] for e in cli_log["evals"]], rel=1e-5
    )
    # The same request again is refused: the output is an adapter the user made.
    with pytest.raises(softprompt.UserError, match="--overwrite"):
        softprompt.plan_training(request, lambda: pytest.fail("loaded the model"))


def test_a_residual_reparameterised_prompt_starts_as_the_plain_one_and_saves_plain_rows(
    spm, tmp_path
):
    # --reparam residual: the rows the model sees are rows + up(relu(down(rows))), up starting
    # at zero, so the first evaluation is the plain prompt's; what is saved is the rows the
    # model saw at the kept step, a plain PEFT prompt that scores as the run said it did.
    from softprompt.tuning.reparam import Residual

    texts = ["be kind every day", "hope is a light", "small steps up the mountain"] * 4
    start = init_prompt(spm.base, 4, seed=1)
    plain = train(spm, "plain", start, texts, texts[:3], TrainConfig(epochs=1), progress=False)
    config = TrainConfig(epochs=3, reparam="residual", lr=0.05)
    result = train(spm, "res", start, texts, texts[:3], config, progress=False)
    assert result.evals[0]["loss"] == pytest.approx(plain.evals[0]["loss"], rel=1e-6)
    assert result.loss_after < result.loss_before
    mlp = Residual(start)
    assert result.trainable_params == sum(p.numel() for p in mlp.parameters()) > start.numel()
    saved = save_trained(spm, "res", tmp_path / "res", config, result)
    adapter = load_adapter(saved)
    assert adapter.method == "prompt" and adapter.weights.shape == start.shape
    assert not torch.equal(adapter.weights, start)
    assert json.loads((saved / "training_config.json").read_text())["reparam"] == "residual"
    spm.remove_adapter("res")
    spm.add_adapter(adapter)
    assert evaluate(spm, texts[:3], "res").loss == pytest.approx(result.loss_after, rel=1e-5)


@pytest.mark.parametrize(
    ("asked", "source", "method", "reparam"),
    [
        ({}, None, "prefix", "none"),  # task data: the suite's choice
        ({"method": "prompt"}, None, "prompt", "residual"),
        ({"method": "prompt", "reparam": "none"}, None, "prompt", "none"),
        ({"reparam": "residual"}, None, "prompt", "residual"),  # only prompt rows have one
        ({}, "prompt", "prompt", "residual"),  # --init-from a prompt continues a prompt
        ({}, "prefix", "prefix", "none"),
        ({"method": "prefix"}, "prompt", "prefix", "none"),  # deepens the prompt
    ],
)
def test_the_method_and_reparam_defaults_follow_the_data_and_the_source(
    asked, source, method, reparam
):
    for formats in (["completion"], ["chat"], ["completion", "chat"]):
        config = TrainConfig(**asked).resolve(formats, source_method=source)
        assert (config.method, config.reparam) == (method, reparam)
    # Plain text (the guide's data) keeps plain prompt tuning unless told otherwise.
    text = TrainConfig(**asked).resolve(["text"], source_method=source)
    assert text.method == asked.get("method", source or "prompt")
    assert text.reparam == asked.get("reparam", "none")
    mixed = TrainConfig().resolve(["text", "completion"])
    assert (mixed.method, mixed.reparam) == ("prompt", "none")


def test_the_learning_rate_default_follows_the_method_and_the_data():
    # Prefix tuning on task data: the suite's choice (docs/benchmarks/tasks.md); a prefix on plain
    # text keeps 1e-2, prompt tuning 3e-2 everywhere; an asked --lr always wins.
    for formats in (["completion"], ["chat"]):
        assert TrainConfig().resolve(formats).lr == TASK_PREFIX_LR == 3e-2
        assert TrainConfig(method="prompt").resolve(formats).lr == 3e-2
        assert TrainConfig(lr=0.5).resolve(formats).lr == 0.5
    assert TrainConfig(method="prefix").resolve(["text"]).lr == 1e-2
    assert TrainConfig().resolve(["text"]).lr == 3e-2
    assert TrainConfig(method="prefix").resolve(["text", "chat"]).lr == 1e-2


def test_reparam_is_refused_when_the_run_continues_a_prefix():
    with pytest.raises(UserError, match="--reparam residual reparameterises prompt rows"):
        TrainConfig(reparam="residual", init_from="x").resolve(["chat"], source_method="prefix")


def test_reparam_is_refused_for_prefix_tuning():
    with pytest.raises(UserError, match="--reparam residual reparameterises prompt rows"):
        TrainConfig(method="prefix", reparam="residual")


def test_a_small_task_set_gets_the_epochs_of_its_minimum_steps():
    from softprompt.tuning.config import DEFAULT_EPOCHS, MIN_TASK_STEPS

    task = ["completion"]
    # 108 rows at 8 a step: 14 steps an epoch, so 15 epochs make at least the minimum
    small = TrainConfig().resolve(task, rows_per_epoch=(108, 8))
    assert small.epochs == -(-MIN_TASK_STEPS // 14) == 15
    # two processes make steps of 16 rows: 7 an epoch
    assert TrainConfig().resolve(task, rows_per_epoch=(108, 16)).epochs == 29
    # a set whose default epochs already make the minimum keeps them
    assert TrainConfig().resolve(task, rows_per_epoch=(1000, 8)).epochs == DEFAULT_EPOCHS
    # plain text, a number of epochs asked for, or no rows known: as asked, else the default
    assert TrainConfig().resolve(["text"], rows_per_epoch=(108, 8)).epochs == DEFAULT_EPOCHS
    assert TrainConfig(epochs=2).resolve(task, rows_per_epoch=(108, 8)).epochs == 2
    assert TrainConfig().resolve(task).epochs == DEFAULT_EPOCHS


def test_the_cli_says_how_many_epochs_the_data_decided(tiny_model_dir, tmp_path, cli_main):
    rows = [{"prompt": f"{w} :", "completion": " hope"} for w in "be kind brave every day".split()]
    data = tmp_path / "small.jsonl"
    write_jsonl(data, rows * 4)
    out = tmp_path / "adapter"
    done = cli_main(
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
        "--batch-size", "6", "--no-search", "--virtual-tokens", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # 18 training rows (2 held out) at 6 a step: 3 steps an epoch, 67 epochs for 200 steps
    assert (
        "epochs: 67, for at least 200 steps on 18 training rows (5 on a larger set; --epochs "
        "sets another), and on while the held-out loss improves, up to 134" in done.stdout
    )
    config = json.loads((out / "training_config.json").read_text())
    assert (config["epochs"], config["max_epochs"]) == (67, 134)
    log = json.loads((out / "loss_log.json").read_text())
    assert 67 <= log["epochs_trained"] <= 134
    assert len(log["steps"]) == 3 * log["epochs_trained"]
