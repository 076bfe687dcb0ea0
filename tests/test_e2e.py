"""End to end on the embedded model (SmolLM2-135M-Instruct), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl

pytestmark = pytest.mark.slow


# A guard against a hang, not a speed check: the demo took 7 min alone on a 2-core AMD EPYC
# without AVX-512 (2026-12-01) and runs beside other tests under make test.
CLI_TIMEOUT = 1800


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two small adapters trained through the CLI: a few steps each, to keep the suite short."""
    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for name, data, extra in [
        ("quotes", "examples:quotes", ["--init", "vocab"]),
        (
            "roles",
            "examples:role-prompts",
            ["--init", "text", "--init-text", "I want you to act as"],
        ),
    ]:
        proc = cli(
            "train",
            "--data",
            data,
            "--output",
            str(root / name),
            "--max-samples",
            "48",
            "--epochs",
            "1",
            "--max-length",
            "40",
            "--json",
            *extra,
        )
        summary = json.loads(proc.stdout)
        assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
        out[name] = root / name
    return out


def test_peft_loads_our_adapter_with_the_same_loss(adapters):
    from peft import PeftModel

    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel
    from softprompt.rows import training_rows

    proc = cli(
        "eval",
        "--data",
        "examples:quotes:heldout",
        "--adapter",
        str(adapters["quotes"]),
        "--max-samples",
        "12",
        "--max-length",
        "40",
        "--json",
    )
    ours = {r["adapter"]: r for r in json.loads(proc.stdout)}["quotes"]

    base = load_base_model()
    spm = SoftPromptModel(load_base_model())  # a second copy only to tokenise the same way
    peft_model = PeftModel.from_pretrained(base.model, str(adapters["quotes"]))
    from softprompt.data import load_texts

    texts = load_texts("examples:quotes:heldout", max_samples=12).texts
    total, count = 0.0, 0
    for ids, _, _ in training_rows(spm, texts, None, 40)[0]:
        labels = torch.tensor([ids])
        labels[0, 0] = -100  # softprompt does not score the first text token
        with torch.no_grad():
            loss = peft_model(input_ids=torch.tensor([ids]), labels=labels).loss
        total += float(loss) * (len(ids) - 1)
        count += len(ids) - 1
    assert count == ours["tokens"]
    assert total / count == pytest.approx(ours["loss"], rel=1e-4)


def test_mixed_batch_generation_equals_one_by_one(adapters, tmp_path):
    prompts = [
        "I want you to act as a motivational coach. ",
        "There are two nice things that should matter to you:",
        "I want you to act as a travel guide for Rome.",
        "Courage is",
    ]
    rows = [{"prompt": p, "adapter": a} for p in prompts for a in (None, "quotes", "roles")]
    requests = tmp_path / "requests.jsonl"
    write_jsonl(requests, rows)
    runs = []
    for batch_size in ("1", "16"):
        proc = cli(
            "generate",
            "--adapter",
            str(adapters["quotes"]),
            "--adapter",
            str(adapters["roles"]),
            "--requests",
            str(requests),
            "--max-new-tokens",
            "17",
            "--repetition-penalty",
            "1.5",
            "--batch-size",
            batch_size,
            "--json",
        )
        runs.append([json.loads(line) for line in proc.stdout.splitlines()])
    assert [r["completion"] for r in runs[0]] == [r["completion"] for r in runs[1]]
    assert [(r["prompt"], r["adapter"]) for r in runs[1]] == [
        (r["prompt"], r["adapter"]) for r in rows
    ]
    completions = [r["completion"] for r in runs[1]]
    assert all(c.strip() for c in completions)
    # The adapters change what the model says.
    assert completions[0] != completions[1] or completions[0] != completions[2]


def test_generation_matches_inputs_embeds_reference(adapters):
    """The engine's greedy output (packed weights, cached prefix, mixed batch) equals
    transformers' generate() on the untouched base model with the trained rows prepended,
    token for token, up to the reference's EOS."""
    from softprompt.adapters import load_adapter
    from softprompt.engine import SamplingParams
    from softprompt.generation import engine_for
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    untouched = load_base_model()
    spm = SoftPromptModel(load_base_model())
    adapter = load_adapter(adapters["roles"])
    spm.add_adapter(adapter)
    text = spm.text_ids("I want you to act as a chef. ")
    embed = untouched.model.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([adapter.weights, embed(torch.tensor(text))]).unsqueeze(0)
    length = embeds.shape[1]
    reference = untouched.model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(1, length, dtype=torch.long),
        max_new_tokens=20,
        do_sample=False,
    )[0].tolist()
    eos = untouched.tokenizer.eos_token_id
    if eos in reference:
        reference = reference[: reference.index(eos)]
    engine = engine_for(spm)
    assert engine.runner.packed
    # It runs beside other requests, which join a step later.
    params = SamplingParams(max_new_tokens=20)
    handle = engine.submit("I want you to act as a chef. ", "roles", params)
    engine.step()
    others = [engine.submit(p, a, params) for p in ("Hello", "The sea is") for a in (None, "roles")]
    ours = handle.result().token_ids
    assert all(h.result().token_ids for h in others)
    assert ours == reference
    assert len(ours) >= 5  # a real completion, not a stop after a token or two


def _load_embedded(env: dict[str, str]) -> subprocess.Popen[str]:
    code = "from softprompt.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "eval", "--data", "examples:quotes:heldout"]
        + ["--max-samples", "2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_processes_converting_the_embedded_model_at_once_both_succeed(tmp_path):
    env = {**os.environ, "SOFTPROMPT_CACHE": str(tmp_path / "cache")}
    procs = [_load_embedded(env) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out)[0]["tokens"] > 0
    assert json.loads(outputs[0][0]) == json.loads(outputs[1][0])
    # Nothing half-converted is left beside the model (the lock file may stay).
    models = tmp_path / "cache" / "models"
    left = sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))
    assert left == ["SmolLM2-135M-Instruct"]


def test_a_damaged_cached_model_is_converted_again(tmp_path, monkeypatch):
    """A truncated weights file is noticed and rebuilt. The rebuild copies the good cached
    folder instead of converting again, to save a minute: the conversion itself is what the
    test above runs for real."""
    import shutil

    from softprompt import models

    good = models.embedded_model_dir()
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / models.EMBEDDED_NAME
    shutil.copytree(good, target)
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)
    converted = []
    monkeypatch.setattr(
        models, "_convert_embedded", lambda to: converted.append(shutil.copytree(good, to))
    )
    assert models.embedded_model_dir() == target
    assert converted == [target]
    assert weights.stat().st_size == size
    assert models.embedded_model_dir() == target and len(converted) == 1  # whole again: kept


def test_unwritable_model_cache_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "SOFTPROMPT_CACHE": str(blocker / "cache")}
    proc = _load_embedded(env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot write the model cache" in lines[0], err
    assert "SOFTPROMPT_CACHE" in lines[0]


def test_two_identical_trainings_with_two_threads_write_the_same_files(tmp_path):
    """Same seed, same data, two processes of two threads each: the same prompt, bit for bit,
    and the same step losses (before, the prompt table's gradient was summed by racing
    threads and two such runs drifted apart from their second step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        args = ["--data", "examples:quotes", "--max-samples", "24", "--epochs", "1"]
        args += ["--batch-size", "4", "--seed", "7", "--virtual-tokens", "8"]
        subprocess.run(
            [sys.executable, "-m", "softprompt.cli", "train", *args, "--output", str(out)],
            env=env,
            check=True,
            capture_output=True,
            timeout=900,
        )
        runs.append(out)
    first, second = (json.loads((r / "loss_log.json").read_text())["steps"] for r in runs)
    assert [s["loss"] for s in first] == [s["loss"] for s in second]
    weights = [(r / "adapter_model.safetensors").read_bytes() for r in runs]
    assert weights[0] == weights[1]
