"""Fixtures: a tiny Llama (two layers, hidden 16) with a word-level tokenizer, built offline."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

# Tests never reach the Hub; unknown ids must fail fast instead of retrying. Set before any
# Hugging Face library is imported, since they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Under pytest-xdist two workers share the machine's cores: one torch thread each (and in every
# CLI subprocess they start), instead of each oversubscribing every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = """
i want you to act as a motivational coach travel guide chef teacher poet the be kind brave
every day small steps mountain river light hope courage my first request is and of in on
with your will me help there are two nice things that should matter : . , ! ?
""".split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


@pytest.fixture()
def cli_main(capsys: pytest.CaptureFixture[str]):
    """Run the CLI's entry point in this process: its exit status, stdout and stderr.

    For the many bad-input checks that need no fresh process: the same code path as
    ``python -m softprompt.cli`` without paying for a new interpreter and imports each time.
    """
    import subprocess

    from softprompt.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny causal LM folder, loadable by softprompt and PEFT alike."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        initializer_range=0.3,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def spm(tiny_model_dir: Path):
    """A fresh SoftPromptModel on the tiny model."""
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    return SoftPromptModel(load_base_model(str(tiny_model_dir)))


@pytest.fixture()
def texts_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.jsonl"
    lines = [
        {"text": "be kind every day", "id": 1},
        {"text": "small steps up the mountain", "id": 2},
        {"text": "hope is a light in the river", "id": 3},
        {"text": "courage and hope every day", "id": 4},
        {"text": "be brave , be kind", "id": 5},
        {"text": "the mountain and the river", "id": 6},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# What a rendered report page shows, read in the browser.
PAGE_FACTS = """() => ({
    tables: document.querySelectorAll('table').length,
    matrixRows: document.querySelectorAll('table.matrix tr').length,
    images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
    height: document.body.scrollHeight,
})"""


def check_report_page(facts: dict) -> None:
    """What a rendered report of two adapters must show, whoever made it."""
    assert facts["matrixRows"] == 4  # header, base model, two adapters
    assert len(facts["images"]) == 3  # heatmap, two loss curves
    assert all(done and w > 200 and h > 100 for done, w, h in facts["images"])
    assert facts["headings"][:3] == [
        "Knowledge preservation",
        "Evaluation: mean loss per token (lower is better)",
        "Before / after: generations",
    ]


def docs_screenshot(name: str) -> Path | None:
    """Where a page test saves a screenshot for the docs: ``$SOFTPROMPT_DOCS_SCREENSHOTS/name``
    when that is set (``make screenshots`` sets it to docs/images), else nowhere."""
    folder = os.environ.get("SOFTPROMPT_DOCS_SCREENSHOTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / name


def pinned(registry, name: str) -> int:
    """Running requests of an engine's ``AdapterRegistry`` that hold adapter ``name`` now."""
    with registry._lock:
        entry = registry._entries.get(name) or registry._resident.get(name)
        return entry.pins if entry else 0


@pytest.fixture()
def render_page():
    """Open an HTML file in headless Chromium; return its facts and save a full-page screenshot.

    Fails (never skips) without a browser: the page tests are part of what CI checks, and
    .ci/run installs Debian's chromium.
    """
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")

    def render(page_path: Path, screenshot: Path, docs_name: str | None = None) -> dict:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=executable,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            facts = page.evaluate(PAGE_FACTS)
            page.screenshot(path=str(screenshot), full_page=True)
            if docs_name and (shot := docs_screenshot(docs_name)):
                page.screenshot(path=str(shot))  # the first screen, as a reader opens it
            browser.close()
        return facts

    return render


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first: under xdist they then run beside the rest, not after it."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)


@pytest.fixture()
def word_data(tmp_path: Path):
    """``make(count, seed, held)``: a training file of ``count`` random texts over the tiny
    model's words, and a held-out file of the texts ``held`` (JSON lines, field ``text``)."""
    import json
    import random

    def make(count: int, seed: int, held: list[str]) -> tuple[Path, Path]:
        words = "be kind brave every day small steps hope courage and".split()
        rng = random.Random(seed)
        texts = [
            " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(count)
        ]
        train_file, held_file = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
        train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        held_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
        return train_file, held_file

    return make


def start_serve(args: list[str], env: dict[str, str] | None = None):
    """``softprompt serve ARGS`` in its own process, read up to its "playground at" line:
    ``(process, base URL, the start-up lines)``. The caller stops the process."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt.cli", "serve", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while not lines or "playground at" not in lines[-1]:
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    return proc, lines[-1].split("playground at ")[1].strip().rstrip("/"), lines


def with_chat_template(model_dir: Path, target: Path, template: str) -> Path:
    """A copy of the model folder ``model_dir`` at ``target`` whose tokenizer has ``template``
    as its chat template (for the CLI, which loads models from folders)."""
    shutil.copytree(model_dir, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    return target


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """``rows`` as JSON lines at ``path`` (each a dict, or anything with ``as_json()``)."""
    path.write_text(
        "".join(json.dumps(r.as_json() if hasattr(r, "as_json") else r) + "\n" for r in rows)
    )
    return path
