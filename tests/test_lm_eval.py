"""The real lm-evaluation-harness against a live ``softprompt serve`` app (its
``local-completions`` model, which scores by ``echo`` + ``logprobs``): its accuracy on a
multiple-choice task equals softprompt's own rank classification on the same rows, for the base
model and for an adapter, and its generate_until task runs through the server too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt.adapters import Adapter, adapter_config, write_adapter_files
from softprompt.data import Example
from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.insight.scoring import choice_accuracy
from softprompt.prompt import SoftPromptModel
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import ServerThread

CHOICES = ["river", "mountain", "hope", "courage"]
ROWS = [
    ("i want you to act as a", 0),
    ("be kind every", 1),
    ("there are two nice things", 2),
    ("my first request is", 3),
    ("small steps up the", 1),
    ("light on the", 0),
    ("the teacher and the", 2),
    ("be brave and", 3),
]

CHOICE_TASK = """task: sp_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: sp_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    folder = tmp_path_factory.mktemp("adapters")
    rows = torch.randn(3, base.model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    adapter = Adapter("coach", rows * 4)
    (folder / "coach").mkdir()
    write_adapter_files(folder / "coach", adapter.weights, adapter_config(adapter, "tiny"))
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=8))
    app = create_app(engine, ServerConfig(model_name="tiny", adapters_dir=folder))
    with ServerThread(app) as url:
        yield url, base, adapter, engine


def _evaluate(url: str, model: str, tokenizer: Path, tasks: Path) -> tuple[dict, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="local-completions",
        model_args=(
            f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},num_concurrent=1,max_retries=1,max_length=200"
        ),
        tasks=["sp_choice", "sp_generate"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=4,
        log_samples=True,
    )
    return out["results"], out["samples"]


def _loglik(spm: SoftPromptModel, adapter: str | None, prompt: str, candidate: str) -> float:
    """log p(candidate | virtual tokens, prompt), one forward of one unpadded row."""
    tok = spm.tokenizer
    ids = tok(prompt)["input_ids"]
    cand = tok(candidate, add_special_tokens=False)["input_ids"]
    row = spm.virtual_ids(adapter) + ids + cand
    with torch.no_grad():
        logits = spm.forward(torch.tensor([row])).logits[0].float().log_softmax(-1)
    start = len(row) - len(cand)
    return sum(float(logits[start + j - 1, t]) for j, t in enumerate(cand))


def test_lm_eval_scores_the_server_as_softprompt_does(
    server, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the rows are local files
    url, base, adapter, engine = server
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "choices": CHOICES, "label": label}) + "\n"
            for p, label in ROWS
        )
    )
    (tmp_path / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (tmp_path / "generate.yaml").write_text(GEN_TASK.format(data=data))
    spm = SoftPromptModel(base)
    spm.add_adapter(adapter)
    # lm-eval's continuation is " " + choice after the context (its target delimiter).
    examples = [Example(completion=" " + CHOICES[label], prompt=p) for p, label in ROWS]
    params = SamplingParams(max_new_tokens=4, stop=["."])
    for model, name in (("tiny", None), ("coach", "coach")):
        results, logged = _evaluate(url, model, tiny_model_dir, tmp_path)
        samples = logged["sp_choice"]
        ours = choice_accuracy(spm, examples, name, "rows", [" " + c for c in CHOICES])
        assert results["sp_choice"]["acc,none"] == pytest.approx(ours.accuracy), model
        # Row by row, every choice: lm-eval's log-likelihood through the server equals a
        # one-row forward of the model with the adapter's virtual tokens.
        assert len(samples) == len(ROWS)
        for sample in samples:
            prompt = sample["doc"]["prompt"]
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            expected = [_loglik(spm, name, prompt, " " + c) for c in CHOICES]
            assert theirs == pytest.approx(expected, abs=1e-3), (model, prompt)
        # generate_until: lm-eval's greedy text is the engine's, stopped at its "until"
        generated = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in logged["sp_generate"]}
        for prompt, _ in ROWS:
            expected = engine.generate([prompt], [name], params)[0].text
            assert generated[prompt] == expected, (model, prompt)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_lm_eval_hf_with_peft_scores_a_softprompt_adapter_as_softprompt_does(
    tiny_model_dir, tmp_path, monkeypatch, method
):
    """The other route: lm-eval's own ``hf`` model with ``peft=ADAPTER`` (PEFT loads the
    folder); its log-likelihoods equal softprompt's for a prompt and a prefix adapter."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from softprompt.models import load_base_model
    from softprompt.tuning.init import init_prefix, init_prompt
    from softprompt.tuning.save import save_trained
    from softprompt.tuning.train import TrainConfig, train

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = load_base_model(str(tiny_model_dir))
    spm = SoftPromptModel(base)
    texts = [f"{p} {CHOICES[label]}" for p, label in ROWS] * 2
    config = TrainConfig(virtual_tokens=3, epochs=1, lr=0.1, batch_size=4, method=method)
    rows = init_prompt(base, 3) if method == "prompt" else init_prefix(base, 3)
    result = train(spm, "coach", rows, texts, texts[:2], config, progress=False)
    folder = save_trained(spm, "coach", tmp_path / "coach", config, result, {})
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "choices": CHOICES, "label": label}) + "\n"
            for p, label in ROWS
        )
    )
    (tmp_path / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir},peft={folder},dtype=float32",
        tasks=["sp_choice"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=1,
        log_samples=True,
        device="cpu",
    )
    from softprompt.layout import example_layout
    from softprompt.rows import batch_loss

    for sample in out["samples"]["sp_choice"]:
        prompt = sample["doc"]["prompt"]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        # softprompt's own scoring path (rank classification's), which serves prefixes too
        rows = []
        for c in CHOICES:
            layout = example_layout(spm.tokenizer, Example(" " + c, prompt), 64, eos=False)
            virtual = spm.virtual_ids("coach")
            rows.append((virtual + layout.ids, len(virtual), layout.scored))
        with torch.no_grad():
            loss, _ = batch_loss(spm, rows, False, per_row=True)
        assert theirs == pytest.approx((-loss).tolist(), abs=1e-3), prompt
