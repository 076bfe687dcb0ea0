"""The demo replaces only what an earlier demo wrote; anything else is refused before work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt.cli.demo import check_demo_output
from softprompt.errors import UserError


def _adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")


def _mine(folder: Path, entry: str) -> Path:
    path = folder / entry
    if entry.endswith((".html", ".json")):
        path.write_text("my own file")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("my own file")
    return path


@pytest.mark.parametrize("entry", ["quotes", "role-prompts", "report.html", "summary.json"])
def test_cli_refuses_a_folder_holding_the_users_things(tmp_path, entry, cli_main):
    path = _mine(tmp_path, entry)
    proc = cli_main("demo", "--output", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not written by an earlier softprompt demo" in lines[0]
    assert "--overwrite" in lines[0]
    mine = path if path.is_file() else path / "notes.txt"
    assert mine.read_text() == "my own file"


def test_a_users_adapter_is_replaced_only_with_overwrite(tmp_path):
    _adapter(tmp_path / "quotes")
    with pytest.raises(UserError, match="not written by an earlier softprompt demo"):
        check_demo_output(tmp_path)
    check_demo_output(tmp_path, overwrite=True)


def test_overwrite_still_never_replaces_what_is_not_an_adapter_or_report(tmp_path):
    _mine(tmp_path, "quotes")
    with pytest.raises(UserError, match="not an adapter folder"):
        check_demo_output(tmp_path, overwrite=True)
    (tmp_path / "quotes" / "notes.txt").unlink()
    (tmp_path / "quotes").rmdir()
    _mine(tmp_path, "report.html")
    with pytest.raises(UserError, match="not a softprompt report"):
        check_demo_output(tmp_path, overwrite=True)


def test_an_earlier_demos_output_is_replaced(tmp_path):
    for name in ("quotes", "role-prompts"):
        _adapter(tmp_path / name)
    from softprompt.insight.report import GENERATOR_META

    (tmp_path / "report.html").write_text(f"<!doctype html><head>{GENERATOR_META}</head>")
    summary = {"written_by": "softprompt demo", "adapters": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    check_demo_output(tmp_path)
    # A summary from before the written_by field, with the demo's own shape, is recognised too.
    old = {"base_checksum": "ab", "adapters": {"quotes": {}, "role-prompts": {}}}
    (tmp_path / "summary.json").write_text(json.dumps(old))
    check_demo_output(tmp_path)


def test_unrelated_files_beside_the_output_are_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    check_demo_output(tmp_path)
    check_demo_output(tmp_path / "new-folder")
