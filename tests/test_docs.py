"""The README stays short and true: its module map names the tree as it is, and
no link in it or in docs/ leads nowhere.

Fast: reads files only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PACKAGES = ("job", "serve", "common")
# Generated modules, each folder named by one line of the map (as the folder, not the modules).
GENERATED = ("serve/protos/",)
MAX_README_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside:
            out.append((number, line))
    return out


def module_map() -> list[str]:
    """The paths the README's module map names: the first word of each line of
    the code block under `## Module map`."""
    lines = README.read_text().splitlines()
    start = lines.index("## Module map")
    open_ = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    close = next(i for i in range(open_ + 1, len(lines)) if lines[i].startswith("```"))
    return [line.split()[0] for line in lines[open_ + 1:close] if line.strip()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_readme_is_under_250_lines():
    count = len(README.read_text().splitlines())
    assert count < MAX_README_LINES, f"README.md has {count} lines; move detail to docs/"


def test_the_readme_keeps_its_two_commands():
    text = README.read_text()
    assert "\nmake demo " in text and "\nmake test " in text


def test_every_path_in_the_module_map_exists():
    paths = module_map()
    assert len(paths) > 20, paths
    missing = [p for p in paths if not (REPO / p).exists() or p.endswith("/") != (REPO / p).is_dir()]
    assert not missing, f"the README's module map names what the tree lacks: {missing}"


def test_every_module_is_in_the_module_map():
    named = set(module_map())
    modules = sorted(
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
        and not path.relative_to(REPO).as_posix().startswith(GENERATED)
    )
    assert modules
    unnamed = [m for m in modules if m not in named]
    assert not unnamed, f"add these to the README's module map: {unnamed}"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_files_and_headings_that_exist(doc):
    broken = []
    for number, line in prose_lines(doc.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{number}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{number}: {target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)
