"""scripts/profile_run.sh with a stand-in `dvc`: the profile's results are saved, the
workspace is back to the default profile, and the profile's own data and models survive
the checkout of the default outputs (a checkout that removes them, as one did)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_DVC = """#!/bin/sh
# repro: the profile's outputs; checkout: the default outputs back, and the profile's gone
case "$1" in
repro)
    mkdir -p data/corpus_tiny models_tiny/best/finetune results/evaluate
    echo images > data/corpus_tiny/manifest.csv
    echo weights > models_tiny/best/finetune/final.pt
    echo "method,muap" > results/evaluate/methods.csv; echo "best_finetune,0.9" >> results/evaluate/methods.csv
    echo "profile lock" > dvc.lock
    echo "ran stage 'train'" ;;
checkout)
    rm -rf data/corpus_tiny models_tiny ;;
esac
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_profile_run_keeps_the_profiles_data_and_restores_the_default(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "profile_run.sh", repo / "scripts")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "profiles").mkdir()
    (repo / "profiles" / "tiny.yaml").write_text(
        "data: {corpus_dir: data/corpus_tiny}\nevalset: {dir: data/eval_tiny}\n"
        "features: {dir: data/features_tiny}\npipeline: {models: models_tiny}\n")
    (repo / "results" / "evaluate").mkdir(parents=True)
    (repo / "results" / "evaluate" / "methods.csv").write_text("method,muap\nbest_finetune,0.8\n")
    (repo / "dvc.lock").write_text("default lock\n")
    (repo / "README.md").write_text("readme\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "study.md").write_text("study\n")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "dvc").write_text(FAKE_DVC)
    for tool in ("python", "dvc"):
        (venv / tool).chmod(0o755)
    (repo / ".gitignore").write_text("/.venv/\n/data/\n/models_tiny/\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "start")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", "scripts/profile_run.sh", "tiny"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (repo / "data" / "corpus_tiny" / "manifest.csv").read_text() == "images\n"
    assert (repo / "models_tiny" / "best" / "finetune" / "final.pt").read_text() == "weights\n"
    assert (repo / "dvc.lock").read_text() == "default lock\n"
    assert (repo / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    assert "0.8" in (repo / "results" / "evaluate" / "methods.csv").read_text()
    saved = repo / "results" / "profiles" / "tiny"
    assert "0.9" in (saved / "evaluate" / "methods.csv").read_text()
    assert "ran stage 'train'" in (saved / "repro.log").read_text()
    assert json.loads((saved / "run.json").read_text())["profile"] == "tiny"


def test_profile_run_refuses_uncommitted_results(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "profile_run.sh", repo / "scripts")
    (repo / "results").mkdir()
    (repo / "results" / "a.csv").write_text("x\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "start")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    for tool in ("python", "dvc"):
        (venv / tool).write_text("#!/bin/sh\nexit 0\n")
        (venv / tool).chmod(0o755)
    (repo / "results" / "a.csv").write_text("changed\n")
    result = subprocess.run(["bash", "scripts/profile_run.sh", "tiny"], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2 and "uncommitted" in result.stderr
    assert (repo / "results" / "a.csv").read_text() == "changed\n"


def test_profile_run_without_an_environment_says_so(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "profile_run.sh", repo / "scripts")
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}
    if shutil.which("dvc", path=bare["PATH"]):
        return  # a system-wide dvc: nothing missing to report
    result = subprocess.run(["bash", "scripts/profile_run.sh", "tiny"], cwd=repo, env=bare, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "make setup" in result.stderr
