"""What a user sees with bad input or an interrupted run: the list of promises.

Each test feeds one bad input (or one interruption) and checks what the user is
told: a one-line error, `mtl <command>: error: ...`, exit status 2 and no
traceback; or a counted skip.  Every test also checksums the user's own files
before and after: nothing the user owns is deleted or changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mtl.cli import main as mtl
from mtl.data.manifest import unique_ids
from mtl.eval.embeddings import EmbeddingResult, Provenance, load_npz, save_npz
from mtl.io import UserError
from mtl.training.outputs import prepare_run_dir
from tests.configs import study_params

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: what "untouched" means here."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = mtl([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, command: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"mtl {command}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture()
def photos(tmp_path, small_real_photos) -> Path:
    """The user's pictures: two class folders of real photographs."""
    root = tmp_path / "mine" / "images"
    for class_name, names in (("photos", ("chelsea", "coffee", "rocket")), ("scans", ("camera", "china", "flower"))):
        (root / class_name).mkdir(parents=True)
        for name in names:
            small_real_photos[name].save(root / class_name / f"{name}.png")
    return root


def params_file(tmp_path: Path, **data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {**study_params()["data"], "max_side": 64, "workers": 1, **data}}))
    return path


def embedding(method: str, dim: int = 8, n: int = 3, prefix: str = "x", provenance: Provenance | None = None
              ) -> EmbeddingResult:
    rng = np.random.default_rng(dim + n)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return EmbeddingResult(ids=np.array([f"{prefix}{i}" for i in range(n)]),
                           embeddings=vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                           method=method, provenance=provenance)


MTL_PROVENANCE = Provenance(kind="mtl", dim=8, checkpoint="0123456789abcdef", image_size=112,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- 1. nothing the user owns is deleted

def test_corpus_refuses_an_output_folder_that_holds_its_input(tmp_path, photos, capsys):
    user = photos.parent  # mine/, with the pictures in mine/images/
    before = checksums(user)
    params = params_file(tmp_path, source="folder", folder=str(photos), corpus_dir=str(user))
    code, _, err = run(capsys, "corpus", "--params", params)
    assert_one_line_error(code, err, "corpus", "data.folder", "data.corpus_dir")
    assert checksums(user) == before


def test_corpus_refuses_an_output_folder_holding_files_it_did_not_make(tmp_path, photos, capsys):
    pictures = tmp_path / "Pictures"
    (pictures / "images" / "holiday").mkdir(parents=True)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(pictures / "images" / "holiday" / "beach.jpg")
    (pictures / "manifest.csv").write_text("my own list\n")
    before = checksums(pictures)
    params = params_file(tmp_path, source="folder", folder=str(photos), corpus_dir=str(pictures))
    code, _, err = run(capsys, "corpus", "--params", params)
    assert_one_line_error(code, err, "corpus", "did not make")
    assert checksums(pictures) == before


def test_corpus_rebuilds_a_folder_it_made(tmp_path, photos, capsys):
    before = checksums(photos)
    params = params_file(tmp_path, source="folder", folder=str(photos), corpus_dir=str(tmp_path / "corpus"))
    assert run(capsys, "corpus", "--params", params)[0] == 0
    assert run(capsys, "corpus", "--params", params)[0] == 0
    assert checksums(photos) == before


def test_a_run_folder_holding_other_files_is_refused_not_emptied(tmp_path):
    models = tmp_path / "models"
    for run_dir in ("frozen", "finetune"):
        (models / run_dir).mkdir(parents=True)
        (models / run_dir / "final.pt").write_bytes(b"weights of a finished run")
    before = checksums(models)
    fingerprint = {"stage_config": {"lr": 0.001}, "corpus": "abc"}
    with pytest.raises(UserError, match="did not make"):
        prepare_run_dir(models, fingerprint)                  # `-p out_dir models`
    run_dir = models / "frozen"
    (run_dir / "run.json").write_text('{"stage_config": {"lr": 0.01}, "corpus": "abc"}\n')
    (run_dir / "notes.txt").write_text("my notes on this run\n")
    before = checksums(models)
    with pytest.raises(UserError, match="notes.txt"):
        prepare_run_dir(run_dir, fingerprint)                 # a run of ours, plus the user's file
    assert checksums(models) == before


def test_search_refuses_to_write_over_its_input(tmp_path, capsys):
    queries = save_npz(embedding("phash", 64), tmp_path / "q.npz")
    before = checksums(tmp_path)
    code, _, err = run(capsys, "search", "--queries", queries, "--references", queries, "--out", queries)
    assert_one_line_error(code, err, "search", "q.npz")
    assert checksums(tmp_path) == before


# --------------------------------------------------------------------------- 2. ground truth stays clean

def test_ids_never_collide():
    ids = unique_ids(["a", "a", "a-2", "b", "a-2"])
    assert len(set(ids)) == len(ids) == 5
    assert ids[0] == "a" and ids[2] == "a-2" and ids[3] == "b"  # names that were unique stay as they were


def test_same_named_files_give_one_row_and_one_picture_each(tmp_path, photos, small_real_photos, capsys):
    for name, photo in (("x.png", "astronaut"), ("x.jpg", "rocket"), ("x-2.png", "coffee")):
        small_real_photos[photo].rotate(90).save(photos / "scans" / name)
    before = checksums(photos)
    params = params_file(tmp_path, source="folder", folder=str(photos), corpus_dir=str(tmp_path / "corpus"),
                         near_dup_hamming=0)
    assert run(capsys, "corpus", "--params", params)[0] == 0
    manifest = pd.read_csv(tmp_path / "corpus" / "manifest.csv", dtype=str)
    assert manifest["id"].is_unique and manifest["path"].is_unique
    assert {"scans-x", "scans-x-2"} <= set(manifest["id"]) and len(manifest) == 9
    stored = {p.relative_to(tmp_path / "corpus").as_posix() for p in (tmp_path / "corpus" / "images").rglob("*.jpg")}
    assert stored == set(manifest["path"])
    assert checksums(photos) == before


# --------------------------------------------------------------------------- 4. outputs are whole or absent

KILLED_WRITER = """
import os, signal, sys
import numpy as np
from mtl.eval.embeddings import EmbeddingResult, save_npz

def killed_halfway(file, **arrays):
    file = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
    file.write(b"PK\\x03\\x04 half of a zip archive")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

np.savez = killed_halfway
save_npz(EmbeddingResult(ids=np.array(["a"]), embeddings=np.ones((1, 4), np.float32) / 2, method="phash"),
         sys.argv[1])
"""


def test_a_killed_embed_leaves_the_previous_file_intact(tmp_path):
    out = save_npz(embedding("phash", 64), tmp_path / "refs.npz")
    before = out.read_bytes()
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -9
    assert out.read_bytes() == before
    assert load_npz(out).dim == 64


CONCURRENT_WRITER = """
import sys
import numpy as np
from mtl.eval.embeddings import EmbeddingResult, save_npz

n = int(sys.argv[2])
vectors = np.full((2000, 64), 0.125, np.float32)
for _ in range(15):
    save_npz(EmbeddingResult(ids=np.array([f"{n}-{i}" for i in range(2000)]), embeddings=vectors,
                             method="phash"), sys.argv[1])
"""


def test_two_writers_to_one_out_leave_a_whole_file_at_every_moment(tmp_path):
    out = tmp_path / "refs.npz"
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(out), str(n)], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}) for n in (1, 2)]
    partial_reads = 0
    while any(w.poll() is None for w in writers):  # a reader meanwhile only ever sees whole files
        if out.exists():
            try:
                load_npz(out)
            except UserError:
                partial_reads += 1
    assert [w.wait() for w in writers] == [0, 0] and partial_reads == 0
    result = load_npz(out)
    assert len(result.ids) == 2000 and len({i.split("-")[0] for i in result.ids}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.npz"]  # no temp file left behind


# --------------------------------------------------------------------------- 5. incompatible embeddings are refused

def test_search_refuses_hashes_of_another_kind(tmp_path, photos, capsys):
    before = checksums(photos)
    q, r, out = tmp_path / "q.npz", tmp_path / "r.npz", tmp_path / "m.csv"
    assert run(capsys, "embed", "--method", "phash", "--folder", photos, "--out", q)[0] == 0
    assert run(capsys, "embed", "--method", "dhash", "--folder", photos, "--out", r)[0] == 0
    code, _, err = run(capsys, "search", "--queries", q, "--references", r, "--out", out)
    assert_one_line_error(code, err, "search", "phash", "dhash", "--force")
    assert not out.exists()
    assert run(capsys, "search", "--queries", q, "--references", r, "--out", out, "--force")[0] == 0
    assert checksums(photos) == before


@pytest.mark.parametrize("difference", [
    {"checkpoint": "fedcba9876543210"},          # two different checkpoints
    {"kind": "pca", "checkpoint": None},         # MTL-320 against PCA-320 of the backbone
    {"image_size": 224},                         # the same model at another input size
    {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},  # another normalization
])
def test_search_refuses_embeddings_made_differently(tmp_path, capsys, difference):
    q = save_npz(embedding("mtl", provenance=MTL_PROVENANCE, prefix="q"), tmp_path / "q.npz")
    r = save_npz(embedding("mtl", provenance=replace(MTL_PROVENANCE, **difference), prefix="r"), tmp_path / "r.npz")
    code, _, err = run(capsys, "search", "--queries", q, "--references", r, "--out", tmp_path / "m.csv")
    assert_one_line_error(code, err, "search", next(iter(difference)))


def test_embeddings_without_provenance_are_searched_with_a_warning(tmp_path, capsys):
    q = save_npz(embedding("old", prefix="q"), tmp_path / "q.npz")
    r = save_npz(embedding("mtl", provenance=MTL_PROVENANCE, prefix="r"), tmp_path / "r.npz")
    code, _, err = run(capsys, "search", "--queries", q, "--references", r, "--out", tmp_path / "m.csv")
    assert code == 0 and "provenance" in err


# --------------------------------------------------------------------------- 6. extreme images are a counted skip

def test_an_extreme_aspect_ratio_is_a_counted_skip(tmp_path, photos, capsys):
    Image.new("L", (8, 150_000), 128).save(photos / "scans" / "strip.png")
    before = checksums(photos)
    out = tmp_path / "e.npz"
    code, _, err = run(capsys, "embed", "--method", "phash", "--folder", photos, "--out", out)
    assert code == 0 and "extreme_aspect: 1" in err
    result = load_npz(out)
    assert dict(zip(result.failed, result.failed_reasons)) == {"scans/strip.png": "extreme_aspect"}
    assert len(result.ids) == 6
    assert checksums(photos) == before


# --------------------------------------------------------------------------- 7. one-line errors, complete outputs

def test_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "embed", "--method", "phash", "--folder", tmp_path / "nowhere", "--out", tmp_path / "e")
    assert_one_line_error(code, err, "embed", "nowhere")


def test_a_folder_without_images_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "embed", "--method", "phash", "--folder", tmp_path / "empty", "--out", tmp_path / "e")
    assert_one_line_error(code, err, "embed", "no image files")


def test_a_corrupted_embeddings_file_is_a_one_line_error(tmp_path, capsys):
    good = save_npz(embedding("phash", 64), tmp_path / "good.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(good.read_bytes()[:200])
    before = checksums(tmp_path)
    code, _, err = run(capsys, "search", "--queries", broken, "--references", good, "--out", tmp_path / "m.csv")
    assert_one_line_error(code, err, "search", "broken.npz", "mtl embed")
    assert checksums(tmp_path) == before


def test_a_dimension_mismatch_is_a_one_line_error_even_with_force(tmp_path, capsys):
    q = save_npz(embedding("a", dim=8, prefix="q"), tmp_path / "q.npz")
    r = save_npz(embedding("b", dim=16, prefix="r"), tmp_path / "r.npz")
    code, _, err = run(capsys, "search", "--queries", q, "--references", r, "--out", tmp_path / "m.csv", "--force")
    assert_one_line_error(code, err, "search", "8", "16")


def test_a_garbage_checkpoint_is_a_one_line_error_without_unsafe_advice(tmp_path, photos, capsys):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"\x80\x04this is not a checkpoint" * 10)
    before = checksums(tmp_path)
    code, _, err = run(capsys, "embed", "--method", garbage, "--folder", photos, "--out", tmp_path / "e.npz")
    assert_one_line_error(code, err, "embed", "model.pt", "not a readable checkpoint")
    assert "weights_only" not in err
    assert checksums(tmp_path) == before


def test_a_file_name_that_is_not_utf8_reaches_the_matches_csv(tmp_path, photos, capsys):
    odd = os.fsencode(photos / "photos") + b"/caf\xe9.png"
    try:
        with open(odd, "wb") as handle:
            handle.write((photos / "photos" / "coffee.png").read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    before = checksums(photos)
    e, out = tmp_path / "e.npz", tmp_path / "m.csv"
    assert run(capsys, "embed", "--method", "phash", "--folder", photos, "--out", e)[0] == 0
    assert run(capsys, "search", "--queries", e, "--references", e, "--k", "2", "--out", out)[0] == 0
    matches = pd.read_csv(out, encoding="utf-8", encoding_errors="surrogateescape", dtype=str)
    assert len(matches) == 7 * 2                      # every query, none lost to the odd name
    named = set(matches["query_id"])
    assert "photos/caf\udce9.png" in named             # the file system's bytes, as written by `ls`
    assert os.fsencode(photos / "photos" / "caf\udce9.png") == odd
    assert checksums(photos) == before


def test_an_out_without_suffix_reports_the_file_it_wrote(tmp_path, photos, capsys):
    code, out, _ = run(capsys, "embed", "--method", "phash", "--folder", photos, "--out", tmp_path / "refs")
    assert code == 0 and (tmp_path / "refs.npz").is_file() and not (tmp_path / "refs").exists()
    assert out.strip().endswith(str(tmp_path / "refs.npz"))


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "embed", "--debug", "--method", "phash", "--folder", tmp_path / "nowhere",
                       "--out", tmp_path / "e")
    assert code == 2 and "Traceback" in err


# --------------------------------------------------------------------------- 8. the CLI runs in-process

HOST_SCRIPT = """
from mtl.cli import main
print("host script starts", flush=True)
for _ in range(2):
    try:
        main(["search", "--help"])
    except SystemExit:
        pass
print("host script ends", flush=True)
"""


def test_the_command_line_runs_inside_a_host_script_without_restarting_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", HOST_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("host script starts") == 1 and "host script ends" in done.stdout


# --------------------------------------------------------------------------- 9. path checks follow the file system

@pytest.mark.parametrize("out", ["results/../../elsewhere", "results/link/sweep"])
def test_sweep_refuses_an_out_folder_outside_results(tmp_path, monkeypatch, out):
    from mtl.sweep import run_sweep

    project = tmp_path / "project"
    (project / "results").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (project / "results" / "link").symlink_to(tmp_path / "elsewhere")
    monkeypatch.chdir(project)
    before = checksums(tmp_path)
    with pytest.raises(UserError, match="under results/"):
        run_sweep(REPO / "sweeps" / "stage1.yaml", str(REPO / "params.yaml"), out_root=out)
    assert checksums(tmp_path) == before and not (tmp_path / "elsewhere" / "sweep").exists()
