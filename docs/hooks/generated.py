"""MkDocs hook: the pages written from the project itself at build time.

- ``<!-- cli-reference -->`` becomes one section per command with that command's ``--help``,
  from softprompt's own argparse parser, so the reference cannot drift from the code.
- ``<!-- include FILE -->`` becomes FILE from the repository root (CONTRIBUTING.md), its links
  into ``docs/`` rewritten to be relative to the site.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

CLI_MARKER = "<!-- cli-reference -->"
INCLUDE = re.compile(r"<!-- include (\S+) -->")
ROOT = Path(__file__).resolve().parents[2]


def cli_reference() -> str:
    """Markdown: ``softprompt --help``, then every command's help, in the parser's order."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page must not depend on it
    from softprompt.cli import build_parser

    parser = build_parser()
    parts = ["## softprompt", "", "```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                help_text = sub.format_help().rstrip()
                parts += [f"## softprompt {name}", "", "```text", help_text, "```", ""]
    return "\n".join(parts)


def included(match: re.Match[str]) -> str:
    text = (ROOT / match.group(1)).read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs' API)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return INCLUDE.sub(included, markdown)
