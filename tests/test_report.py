"""compare, inspect and the HTML report on the tiny model; the page checked in real Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import check_report_page
from softprompt.adapters import Adapter, load_adapter
from softprompt.data import Texts
from softprompt.engine import SamplingParams
from softprompt.errors import UserError
from softprompt.insight.compare import compare, to_markdown
from softprompt.insight.inspection import inspect_adapter
from softprompt.insight.report import AdapterInfo, build_report, check_writable, write_report
from softprompt.tuning.init import init_prompt
from softprompt.tuning.save import save_trained
from softprompt.tuning.train import TrainConfig, train

KIND = ["be kind every day", "be kind and brave", "kind hope every day"] * 3
RIVER = ["the river and the mountain", "light on the river", "the mountain river"] * 3


@pytest.fixture()
def two_adapters(spm, tmp_path):
    folders = []
    for name, texts in [("kind", KIND), ("river", RIVER)]:
        config = TrainConfig(virtual_tokens=3, epochs=3, lr=0.1, batch_size=4)
        result = train(
            spm, name, init_prompt(spm.base, 3), texts, texts[:3], config, progress=False
        )
        folders.append(
            save_trained(
                spm,
                name,
                tmp_path / name,
                config,
                result,
                {"data": f"{name}.jsonl", "eval_data": f"{name}-held"},
            )
        )
    return spm, folders


def test_compare_runs_each_prompt_on_base_and_adapters(two_adapters):
    spm, _ = two_adapters
    result = compare(
        spm, ["be kind", "the river"], ["kind", "river"], SamplingParams(max_new_tokens=6)
    )
    assert [c.prompt for c in result] == ["be kind", "the river"]
    assert list(result[0].completions) == [None, "kind", "river"]
    markdown = to_markdown(result)
    assert markdown.count("| base model |") == 2 and "| kind |" in markdown
    with pytest.raises(UserError):
        compare(spm, [], ["kind"], SamplingParams())
    with pytest.raises(UserError):
        compare(spm, ["  "], ["kind"], SamplingParams())


def test_inspect_finds_the_rows_own_tokens(spm):
    ids = spm.tokenizer("river mountain hope")["input_ids"]
    rows = spm.embedding.weight[torch.tensor(ids)].detach().clone()
    view = inspect_adapter(spm, Adapter("copy", rows), top_k=5)
    assert [t.nearest[0].id for t in view.tokens] == ids
    assert all(t.nearest[0].cosine == pytest.approx(1.0, abs=1e-5) for t in view.tokens)
    assert all(len(t.nearest) == 5 for t in view.tokens)
    big = inspect_adapter(spm, Adapter("big", rows * 100), top_k=1)
    assert all(t.norm_percentile == 100 and t.norm_z > 3 for t in big.tokens)


def _report(two_adapters, tmp_path) -> Path:
    spm, folders = two_adapters
    infos = [AdapterInfo.read(f.name, f) for f in folders]
    datasets = [Texts("kind-held", KIND[:3], "text"), Texts("river-held", RIVER[:3], "text")]
    html = build_report(
        spm, infos, datasets, ["be kind", "the river"], SamplingParams(max_new_tokens=6)
    )
    output = tmp_path / "report.html"
    write_report(html, output)
    return output


def test_report_content(two_adapters, tmp_path):
    html = _report(two_adapters, tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 3  # heatmap + two loss curves
    assert 'src="http' not in html and 'href="http' not in html  # self-contained
    assert html.count(" &#9733;<br>") == 2  # each adapter's own-domain cell, marked once
    assert "unchanged" in html and two_adapters[0].base_checksum() in html
    assert "trainable params" in html and "nearest tokens" in html


def test_report_output_checks(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_writable(tmp_path / "nope" / "r.html")
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path)


def test_report_never_replaces_a_users_file_without_overwrite(two_adapters, tmp_path):
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    with pytest.raises(UserError, match="not a softprompt report; pass --overwrite"):
        check_writable(mine)
    check_writable(mine, overwrite=True)
    ours = _report(two_adapters, tmp_path)
    check_writable(ours)  # an earlier report may be replaced


@pytest.mark.parametrize(
    "log",
    [
        {"steps": [1, 2], "evals": "x", "trainable_params": "many"},
        {"steps": [{"step": "a", "epoch": 1, "loss": 2}], "evals": [{"epoch": 0, "loss": 1}]},
        {"total_params": 0, "trainable_params": True, "base_checksum_before": 3},
        [],
    ],
)
def test_report_survives_a_malformed_loss_log(two_adapters, tmp_path, log):
    spm, folders = two_adapters
    (folders[0] / "loss_log.json").write_text(json.dumps(log))
    info = AdapterInfo.read("kind", folders[0])
    html = build_report(
        spm, [info], [Texts("kind", KIND, "text")], ["be kind"], SamplingParams(max_new_tokens=4)
    )
    assert "No loss log in this folder" in html


def test_report_renders_in_chromium(two_adapters, tmp_path, render_page):
    page_path = _report(two_adapters, tmp_path)
    shot = tmp_path / "report.png"
    facts = render_page(page_path, shot)
    check_report_page(facts)
    assert facts["tables"] >= 7
    assert shot.read_bytes()[:4] == b"\x89PNG" and facts["height"] > 1500
    # A real screenshot of the whole page: tall enough to hold every section.
    from PIL import Image

    assert Image.open(shot).size[1] >= facts["height"] * 0.9


def test_loss_log_records_base_checksums(two_adapters):
    spm, folders = two_adapters
    log = json.loads((folders[0] / "loss_log.json").read_text())
    assert log["base_checksum_before"] == log["base_checksum_after"] == spm.base_checksum()
    assert load_adapter(folders[0]).num_virtual_tokens == 3


def test_report_reuses_given_results(two_adapters, monkeypatch):
    spm, folders = two_adapters
    infos = [AdapterInfo.read(f.name, f) for f in folders]
    datasets = [Texts("kind-held", KIND[:3], "text")]
    from softprompt.insight.report import eval_matrix

    matrix = eval_matrix(spm, ["kind", "river"], datasets, 64)
    comparisons = compare(spm, ["be kind"], ["kind", "river"], SamplingParams(max_new_tokens=3))

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed what was passed in")

    monkeypatch.setattr("softprompt.insight.report.eval_matrix", forbidden)
    monkeypatch.setattr("softprompt.insight.compare.compare", forbidden)
    html = build_report(
        spm, infos, datasets, ["be kind"], SamplingParams(), matrix=matrix, comparisons=comparisons
    )
    assert f"{matrix[1][0].loss:.3f}" in html
