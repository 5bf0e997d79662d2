"""The documentation holds together: every relative link in README.md and docs/ points at a file
(and, with a #fragment, at a heading) that exists, every docs page is linked from some page, and
the README stays a front page that keeps CI's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.data import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 220

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)


def prose(text: str) -> str:
    """The text with code blocks and code spans left out: a link in code is not a link."""
    return CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file, or heading in a markdown file, is missing."""
    bad = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no {dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target}: no heading #{fragment} in {dest.name}")
    return bad


def linked_pages() -> set[Path]:
    out = set()
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            path = target.partition("#")[0]
            if path and not re.match(r"[a-z][a-z0-9+.-]*:", path):
                dest = (page.parent / path).resolve()
                out.add(dest / "index.md" if dest.is_dir() else dest)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Part one\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#part-one) [file](gone.md) [head](a.md#part-two) `[code](gone.md)`\n"
                    "```\n[block](gone.md)\n```\n[web](https://example.org/x) [self](#top)\n# Top\n")
    assert broken_links(page) == [f"gone.md: no {tmp_path / 'gone.md'}",
                                  "a.md#part-two: no heading #part-two in a.md"]


def test_every_docs_page_is_linked_from_another_page():
    orphans = [p.relative_to(REPO) for p in PAGES[1:] if p.resolve() not in linked_pages()]
    assert orphans == []


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail to docs/"


def test_the_readme_holds_the_test_command_ci_runs():
    """.ci/run runs the README's test command verbatim: the two must stay the same line."""
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci and ci[-1] in (REPO / "README.md").read_text().splitlines()
