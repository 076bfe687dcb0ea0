"""The README, the docs and the benchmark logs they link speak of the project alone: a reader
knows nothing of the team's issue tracker, its work sessions, the machine a figure was taken on
(unless it is named: a CPU, a GPU, a date) or the folders on it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"benchmarks/results/[\w./-]+")

FORBIDDEN = {
    "an issue number": re.compile(r"\bissues? #?\d+", re.I),
    "the team's issue": re.compile(r"\bthe issue'?s?\b", re.I),
    "a work session": re.compile(
        r"\b(first|second|third|fourth|fifth|sixth|seventh|this|that|these|last|next|earlier|"
        r"previous|later|GPU|one) sessions?\b",
        re.I,
    ),
    # (softprompt's own decode-path line, in a log, says "measured earlier on this machine":
    # the machine it runs on, named in the log's header)
    "an unnamed machine": re.compile(
        r"(?<!earlier on )\bthis (\d+-core )?(machine|box|host)\b", re.I
    ),
    "an absolute path on one machine": re.compile(r"(?<![\w.~-])/(tmp|work|root|home)/"),
}


def pages() -> list[Path]:
    """README.md, every page under docs/, and every file under benchmarks/results/ they link
    (a linked folder: the files in it)."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    linked: set[Path] = set()
    for page in docs:
        for link in LINK.findall(page.read_text("utf-8")):
            target = ROOT / link.rstrip(".")
            if target.is_dir():
                linked.update(p for p in target.rglob("*") if p.is_file())
            elif target.is_file():
                linked.add(target)
    return docs + sorted(linked)


def problems(text: str) -> list[str]:
    """Each forbidden phrase in ``text``: ``line N: what (the words)``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(line):
                found.append(f"line {number}: {what} ({match.group(0)!r})")
    return found


def test_the_check_finds_what_it_is_for():
    text = (
        "measured for issue 34 in the third session on this 2-core machine\n"
        "the issue's bar; log at /tmp/b34/run.log and /work/main/x\n"
        "a 2-core AMD EPYC (Zen 4), 2026-12-04; see ~/tmp/x and no sessions kept\n"
    )
    said = problems(text)
    assert [s.split(":")[0] for s in said] == ["line 1"] * 3 + ["line 2"] * 3
    assert any("'issue 34'" in s for s in said) and any("'/work/'" in s for s in said)


def test_the_docs_and_their_logs_speak_of_the_project_alone():
    checked = pages()
    assert len(checked) > 20 and any(p.suffix == ".log" for p in checked)
    found = [
        f"{page.relative_to(ROOT)} {problem}"
        for page in checked
        for problem in problems(page.read_text("utf-8", errors="replace"))
    ]
    assert not found, "\n".join(found)
