"""The whole guide through the real CLI on the embedded model: `softprompt demo`.

In a file of its own so that the test runner can run it beside the other slow tests.
"""

from __future__ import annotations

import json

import pytest

from conftest import check_report_page
from test_e2e import cli

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_guide(tmp_path, render_page):
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    proc = cli("demo", "--output", str(tmp_path / "demo"))
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["base_unchanged"] is True
    # The model that trained both prompts still has exactly the weights of the model file.
    on_disk = SoftPromptModel(load_base_model()).base_checksum()
    assert summary["base_checksum"] == summary["base_checksum_after_training"] == on_disk
    for name in ("role-prompts", "quotes"):
        folder = tmp_path / "demo" / name
        assert (folder / "adapter_model.safetensors").is_file()
        assert (folder / "loss.png").is_file()
        numbers = summary["adapters"][name]
        # A clear held-out gain, not noise: at least 0.5 nats per token.
        assert numbers["loss_after"] < numbers["loss_before"] - 0.5
        assert numbers["loss_after"] < numbers["base_loss"] - 0.5
    assert "trainable params: 4,608 || all params: 134,519,616" in proc.stdout
    assert len(summary["completions"]) == 2
    assert all(len(c["completions"]) == 3 for c in summary["completions"])
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "report.html" in proc.stdout
    assert report.count("data:image/png;base64,") == 3  # heatmap + two loss curves
    assert "The base model's weights are unchanged by training" in report
    facts = render_page(tmp_path / "demo" / "report.html", tmp_path / "demo.png", "report.png")
    check_report_page(facts)
    # A second demo into the same folder replaces its own output without --overwrite.
    from softprompt.cli.demo import check_demo_output

    check_demo_output(tmp_path / "demo")
