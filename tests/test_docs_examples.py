"""Every Python block in the README and the docs runs as written.

Each block runs in a fresh namespace, in a folder holding what the docs' examples name
(``adapters/roles`` and ``adapters/quotes``, adapters of the embedded model), with a live server
where a block talks to ``http://127.0.0.1:8000`` (the block is pointed at the test's server on a
free port). A broken example fails ``make test``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from softprompt.adapters import Adapter, adapter_config, write_adapter_files

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SERVER_URL = "http://127.0.0.1:8000"
ADAPTERS = ("roles", "quotes")


def python_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every fenced Python block, ``where`` as ``page:line``."""
    found = []
    for page in PAGES:
        text = page.read_text("utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


BLOCKS = python_blocks()


def test_the_docs_have_python_examples():
    # The parametrised test below could pass by finding nothing.
    pages = {where.split(":")[0] for where, _ in BLOCKS}
    assert {"README.md", "docs/api.md", "docs/serving.md"} <= pages, pages


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the adapters the examples load, sized for the embedded model."""
    from softprompt.models import load_base_model

    base = load_base_model()
    hidden = base.model.config.hidden_size
    scale = float(base.model.get_input_embeddings().weight.norm(dim=-1).mean()) / hidden**0.5
    folder = tmp_path_factory.mktemp("docs-examples")
    for seed, name in enumerate(ADAPTERS):
        weights = torch.randn(4, hidden, generator=torch.Generator().manual_seed(seed)) * scale
        target = folder / "adapters" / name
        target.mkdir(parents=True)
        write_adapter_files(target, weights, adapter_config(Adapter(name, weights), base.name))
    return folder


@pytest.fixture(scope="module")
def example_server(example_folder: Path):
    """``softprompt serve --adapters adapters`` on the embedded model, on a free port."""
    from softprompt.engine import Engine, EngineConfig
    from softprompt.models import load_base_model
    from softprompt.server.app import ServerConfig, create_app
    from softprompt.server.run import ServerThread

    base = load_base_model()
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=4, tune=False))
    config = ServerConfig(model_name=base.name, adapters_dir=example_folder / "adapters")
    with ServerThread(create_app(engine, config)) as url:
        yield url


@pytest.mark.parametrize("where,code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_example_runs(
    where: str, code: str, example_folder: Path, request: pytest.FixtureRequest, monkeypatch
):
    if SERVER_URL in code:
        code = code.replace(SERVER_URL, request.getfixturevalue("example_server"))
    monkeypatch.chdir(example_folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, where, "exec"), {"__name__": "__docs_example__"})  # noqa: S102
    if "print(" in code:
        assert printed.getvalue().strip(), f"{where} printed nothing"
