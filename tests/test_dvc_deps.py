"""dvc.yaml lists every `mtl` module a stage runs, so a code change reruns the stages it
affects and `dvc repro` never reports stale numbers as current.

A stage's modules are derived from the code: the `mtl` imports of its notebook's cells (or
of the module its command runs), and, transitively, every `mtl` import of those modules,
at the top or inside a function (of the named function only for the notebook's direct
imports from a module of many stage functions, like mtl.study)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtl"


def module_file(name: str) -> Path | None:
    """mtl.a.b -> mtl/a/b.py (or its package __init__), None when it is not a module."""
    parts = name.split(".")
    if parts[0] != "mtl":
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_in(tree: ast.AST, package: str) -> set[str]:
    """`mtl` modules imported anywhere under `tree` (a module or one function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mtl")}
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module.startswith("mtl") or node.level):
            module = node.module if not node.level else _relative(package, node.level, node.module)
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names if module_file(f"{module}.{alias.name}")}
    return {name for name in found if module_file(name)}


def _relative(package: str, level: int, module: str | None) -> str:
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join(base + ([module] if module else []))


def _package_of(path: Path) -> str:
    """The package a relative import in `path` starts from: mtl/eval/x.py and
    mtl/eval/__init__.py both -> mtl.eval."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def closure(seeds: dict[str, set[str] | None]) -> set[Path]:
    """Files of the seed modules and everything they import.  A seed's value names the
    functions whose imports count (None: the whole module)."""
    files, queue = set(), []
    for module, functions in seeds.items():
        path = module_file(module)
        tree = ast.parse(path.read_text())
        files.add(path)
        package = _package_of(path)
        top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        found = set().union(*(imports_in(n, package) for n in top_level)) if top_level else set()
        for node in tree.body:
            if functions is None or (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in functions):
                found |= imports_in(node, package)
        queue += sorted(found)
    while queue:
        path = module_file(queue.pop())
        if path in files:
            continue
        files.add(path)
        queue += sorted(imports_in(ast.parse(path.read_text()), _package_of(path)))
    return files


def notebook_seeds(notebook: Path) -> dict[str, set[str] | None]:
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    seeds: dict[str, set[str] | None] = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtl"):
            if module_file(node.module):
                seeds.setdefault(node.module, set()).update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            seeds.update({alias.name: None for alias in node.names if module_file(alias.name)})
    return seeds


def stage_seeds(cmd: str) -> dict[str, set[str] | None]:
    notebook = re.search(r"(notebooks/\S+\.ipynb)", cmd)
    if notebook:
        return notebook_seeds(ROOT / notebook.group(1))
    module = re.search(r"(?:python|scripts/stage \S+) -m (mtl[\w.]*)", cmd)
    return {module.group(1): None} if module else {}


def listed(deps: list[str], path: Path) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


def stages() -> list[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    found = []
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        deps = [next(iter(d)) if isinstance(d, dict) else d for d in body.get("deps", [])]
        found.append((name, body["cmd"], deps))
    return found


@pytest.mark.parametrize("name,cmd,deps", stages(), ids=[s[0] for s in stages()])
def test_every_module_a_stage_runs_is_a_dependency(name, cmd, deps):
    seeds = stage_seeds(cmd)
    assert seeds, f"{name}: no mtl entry point found in {cmd!r}"
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure(seeds) if not listed(deps, p))
    # The package's __init__ files hold no logic that changes a number.
    missing = [m for m in missing if not m.endswith("__init__.py")]
    assert not missing, f"dvc.yaml stage {name} does not list {missing}"


def test_imports_inside_functions_count():
    code = "import os\n\ndef main():\n    from mtl.params import load_params\n    from .metrics import micro_ap\n"
    assert imports_in(ast.parse(code), "mtl.eval") >= {"mtl.params", "mtl.eval.metrics"}
    assert imports_in(ast.parse("import os"), "mtl") == set()


def test_the_closure_follows_what_the_stage_imports_and_nothing_else():
    files = {p.relative_to(ROOT).as_posix() for p in closure({"mtl.study.training_stages": {"features_stage"}})}
    assert {"mtl/study/training_stages.py", "mtl/features.py", "mtl/loss.py", "mtl/model.py"} <= files
    assert not any(f.startswith("mtl/dedup/") for f in files)
