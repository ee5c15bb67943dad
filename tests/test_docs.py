"""README.md and docs/*.md: every relative link reaches a file (and a heading, for `#anchor`), and the
README stays a getting-started that holds the test command CI runs."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_COMMAND = ".venv/bin/python -m pytest -q"

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-case, punctuation other than '-' and '_'
    removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_ " or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    text = "\n".join(prose_lines(path.read_text()))
    text = re.sub(r"`[^`]*`", "", text)  # code spans hold no links (a link's text may wrap a line)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    assert "README.md" in names and len(PAGES) > 1, names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_reaches_a_file_and_a_heading(page):
    links = relative_links(page)
    broken = []
    for target in links:
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            broken.append(f"{target}: leaves the repository")
            continue
        if anchor:
            if dest.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                broken.append(f"{target}: no heading '{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    readme = set(relative_links(ROOT / "README.md"))
    linked = {t.partition("#")[0] for t in readme}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_a_getting_started_that_holds_the_ci_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: the reference belongs in docs/"
    commands = [line.split("#", 1)[0].strip() for line in lines]
    assert TEST_COMMAND in commands, f"README.md lost the line `{TEST_COMMAND}`"
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert TEST_COMMAND in [line.strip() for line in ci.read_text().splitlines()], \
            f".ci/run no longer runs the README's test command `{TEST_COMMAND}`"


def test_slug_follows_github():
    assert slug("Loader throughput: DALI vs DataLoader + Pillow") == "loader-throughput-dali-vs-dataloader--pillow"
    assert slug("The GPU check: `scripts/gpu_check.sh`") == "the-gpu-check-scriptsgpu_checksh"
    assert slug("The trainer's own view") == "the-trainers-own-view"
