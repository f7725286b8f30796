"""Every relative link and anchor in README.md and docs/ leads somewhere."""

import re
from pathlib import Path

from stack import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken(page: Path) -> list[str]:
    """The links of `page` whose file or anchor does not exist."""
    found = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            found.append(f"{page.name}: {target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            found.append(f"{page.name}: {target} (no such heading)")
    return found


def test_every_link_and_anchor_resolves() -> None:
    """Each relative link in the README and the docs names a file that exists, and each
    anchor a heading of that file."""
    assert [problem for page in pages() for problem in broken(page)] == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    """A link to a missing file and one to a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# Other\n## A `code` heading, with commas\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-heading-with-commas) [gone](missing.md) [bad](other.md#nope)\n"
        "[here](#title)\n# Title\n"
    )
    assert broken(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no such heading)",
    ]


def test_the_readme_stays_a_front_page() -> None:
    """README.md stays short: the manual lives in docs/."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
