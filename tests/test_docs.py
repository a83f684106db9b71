"""What a reader meets: every link of the README and the docs/ pages resolves (files and
the headings they point at), the README stays short, and its quick commands run as
written, by path (`.venv/bin/mtl ...`) and from an activated environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    in_code, found = False, set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not target.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


CELL_BORDER = re.compile(r"(?<!\\)\|")  # an unescaped pipe ends a table cell


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_table_row_has_as_many_cells_as_its_header(page):
    """A pipe inside a cell (a header written |x|, say) splits it and shifts the whole row."""
    lines, ragged = page.read_text().splitlines(), []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1]) and not lines[i - 1].startswith("|"):
            width = len(CELL_BORDER.split(line))
            rows = [n for n in range(i + 1, len(lines)) if lines[n].startswith("|")]
            rows = rows[:next((k for k, n in enumerate(rows) if n != rows[0] + k), len(rows))]
            ragged += [n + 1 for n in rows if len(CELL_BORDER.split(lines[n])) != width]
    assert not ragged, f"{page.name}: table rows with another number of cells than their header, lines {ragged}"


def test_the_readme_leads_and_every_page_is_linked_from_it():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in ("docs/study.md", "docs/data.md", "docs/scale.md", "docs/dedup.md", "docs/architecture.md"):
        assert f"]({page}" in readme, page


def run(command: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_readme_quick_commands_run_by_path_and_activated(tmp_path):
    readme = (ROOT / "README.md").read_text()
    dedup = ".venv/bin/mtl dedup docs/demo --out dedup/"
    embed = ".venv/bin/mtl embed --method best --folder my_references/ --out refs.npz"
    assert dedup in readme and embed in readme
    shutil.copytree(ROOT / "docs" / "demo", tmp_path / "docs" / "demo")
    shutil.copytree(ROOT / "docs" / "demo", tmp_path / "my_references")
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                 if Path(p).resolve() != VENV_BIN.resolve())
    by_path = {**os.environ, "PATH": plain_path, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run(dedup, by_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "duplicate pairs in 3 groups" in result.stdout and (tmp_path / "dedup" / "report.html").is_file()
    result = run(embed, by_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--method best:" in result.stdout and (tmp_path / "refs.npz").is_file()
    activated = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{plain_path}", "VIRTUAL_ENV": str(VENV_BIN.parent),
                 "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run(dedup.replace(".venv/bin/", "") + " --raw", activated, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "raw cosine" in result.stdout
