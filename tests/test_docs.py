"""The documentation: README length, generated CLI reference, links, wording."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _cli_reference() -> str:
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "scripts" / "cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cli_reference()


def test_cli_reference_is_current(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    expected = _cli_reference()
    actual = (ROOT / "docs" / "cli.md").read_text()
    assert actual == expected, (
        "docs/cli.md is out of date with the CLI's help: rerun "
        "`python scripts/cli_reference.py > docs/cli.md`"
    )


def test_readme_is_at_most_200_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/"


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    links = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, in-page anchors
        links.append(target.split("#", 1)[0])
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page):
    missing = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_process_words(page):
    text = page.read_text()
    issues = re.findall(r"issue \d+", text, flags=re.I)
    assert not issues, f"{page.relative_to(ROOT)} names issue numbers: {issues}"
    without_term = re.sub(r"first[- ]session", "", text, flags=re.I)
    sessions = [m.group(0) for m in re.finditer(r".{0,30}\bsessions?\b.{0,30}", without_term, re.I)]
    assert not sessions, (
        f"{page.relative_to(ROOT)} says 'session' outside 'first session': {sessions}"
    )
