"""The whole study, end to end: `dvc repro` of the tiny profile in a copy of the
repository, run as `.venv/bin/dvc repro` from a shell that has not activated the venv
(its PATH lacks .venv/bin).  Every declared output must exist, every number must be
finite and in range, and no executed notebook may carry Jupyter's "IProgress not found"
warning.  (The numbers of the tiny profile mean nothing; the plumbing does.)"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line and (root / line).is_file()]


def copy_repository(dest: Path) -> None:
    for rel in tracked_files(ROOT):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def render(template: str, params: dict, item: str | None = None) -> str:
    """dvc.yaml's ${a.b} from the parameters, ${item} from a foreach list."""
    def value(match) -> str:
        key = match.group(1)
        if key == "item":
            return str(item)
        node = params
        for part in key.split("."):
            node = node[part]
        return str(node)
    return re.sub(r"\$\{([\w.]+)\}", value, template)


def declared_outputs(dvc_yaml: dict, params: dict) -> list[str]:
    paths = []
    for stage in dvc_yaml["stages"].values():
        runs = [(stage, None)]
        if "foreach" in stage:
            items = stage["foreach"]
            items = render(items, params) if isinstance(items, str) else items
            items = yaml.safe_load(items) if isinstance(items, str) else items
            runs = [(stage["do"], item) for item in items]
        for body, item in runs:
            for kind in ("outs", "metrics", "plots"):
                for entry in body.get(kind, []):
                    paths.append(render(next(iter(entry)) if isinstance(entry, dict) else entry, params, item))
    return paths


def numbers(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{prefix}{k}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix.rstrip("."), float(tree)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("study")
    copy_repository(repo)
    subprocess.run([sys.executable, "-m", "mtl.params", "write", "profiles/tiny.yaml", "--out", "params.yaml"],
                   cwd=repo, check=True)
    # Share the downloaded Debian packages with the working copy: no second download.
    (ROOT / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (repo / "data").mkdir(exist_ok=True)
    (repo / "data" / "raw").symlink_to(ROOT / "data" / "raw")
    (repo / ".venv").symlink_to(VENV_BIN.parent)  # the copy's own .venv, as `make setup` makes it
    # Not activated: the venv's bin is not on PATH (scripts/stage finds the interpreter itself).
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != VENV_BIN.resolve())
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    dvc = str(repo / ".venv" / "bin" / "dvc")
    subprocess.run([dvc, "config", "core.no_scm", "true"], cwd=repo, check=True, env=env)
    result = subprocess.run([dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    if result.returncode != 0:
        pytest.fail(f"dvc repro failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return repo


def test_every_declared_output_exists(tiny_study):
    dvc_yaml = yaml.safe_load((tiny_study / "dvc.yaml").read_text())
    params = yaml.safe_load((tiny_study / "params.yaml").read_text())
    outputs = declared_outputs(dvc_yaml, params)
    assert "results/timing/train_frozen@best.json" in outputs and "data/corpus" in outputs
    missing = [p for p in outputs if not (tiny_study / p).exists()]
    assert not missing, f"declared but not produced: {missing}"
    assert (tiny_study / "dvc.lock").is_file()


def test_executed_notebooks_show_no_progress_warning(tiny_study):
    executed = sorted((tiny_study / "results" / "notebooks").glob("*.ipynb"))
    assert len(executed) >= 10
    warned = [p.name for p in executed if "IProgress not found" in p.read_text()]
    assert not warned, f"Jupyter's IProgress warning in {warned}"


def test_metrics_are_gathered_finite_and_in_range(tiny_study):
    metrics = json.loads((tiny_study / "results" / "metrics.json").read_text())
    for key in ("corpus", "features", "train/paper/frozen", "train/paper_mem0/frozen", "train/paper/finetune",
                "train/best/frozen", "train/best_mem0/frozen", "train/best/finetune", "embeddings", "retrieval"):
        assert key in metrics, key
    assert {"before", "after"} <= set(metrics["embeddings"])
    assert metrics["features"]["speedup"] > 0
    recipe_methods = [f"{recipe}_{part}" for recipe in ("paper", "best") for part in
                      ("frozen", "frozen_mem0", "finetune", "finetune_gate", "finetune_fusion", "finetune_gap1280")]
    for method in ("phash", "dhash", "backbone_gap1280", "backbone_pca320", *recipe_methods, "best_finetune_80px",
                   "backbone_gap1280_80px"):
        row = metrics["retrieval"][method]
        for key in ("muap", "recall_at_p90", "acc_at_1"):
            assert 0.0 <= row[key] <= 1.0, (method, key, row[key])
        assert row["fp_at_threshold"] >= 0
        assert row["bytes_per_vector"] > 0
    for name, value in numbers(metrics):
        assert math.isfinite(value), name


def test_rerun_is_a_no_op(tiny_study):
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run([str(VENV_BIN / "dvc"), "status"], cwd=tiny_study, env=env, capture_output=True,
                            text=True, check=True).stdout
    assert "changed" not in status, status


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one 'parameters' cell"


def test_papermill_reads_every_parameter_of_every_notebook():
    """Papermill skips a parameters line with a second `=` (in a comment, say) and warns
    "Passed unknown parameter" on every run: each assigned name must come through."""
    import ast

    import nbformat
    from papermill.translators import PythonTranslator

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells
                    if "parameters" in c.get("metadata", {}).get("tags", []))
        assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
        assert assigned, f"{path.name}: its parameters cell assigns nothing"
        assert [p.name for p in PythonTranslator.inspect(cell)] == assigned, path.name


def test_operating_points_and_diagnosis_are_written(tiny_study):
    points = json.loads((tiny_study / "models" / "operating_points.json").read_text())
    assert {"best", "imagenet", "phash", "dhash"} <= set(points)
    assert points["best"]["gate"] and points["best"]["checkpoint"] == "models/best/finetune/final.pt"
    import pandas as pd

    batchnorm = pd.read_csv(tiny_study / "results" / "diagnose" / "batchnorm.csv")
    assert list(batchnorm["bn"]) == ["-", "train", "frozen"]
    summary = pd.read_csv(tiny_study / "results" / "diagnose" / "active_summary.csv")
    assert set(summary["margin"]) >= {0.45, 1.0} and summary["active_share_last_epoch"].between(0, 1).all()
    readme = (tiny_study / "README.md").read_text()
    assert "(run `dvc repro` to fill this section)" not in readme
