"""The released model (mtl.release): written as a small float16 checkpoint with its card,
used by `mtl dedup` and `mtl embed --method best` when the pipeline has trained none, and
the committed release reproduces the embeddings its card recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.model import load_checkpoint
from mtl.release import RELEASE_DIR, best_model, embedding_distance, load_release, write_release


def write_points(path: Path, checkpoint: Path) -> Path:
    from mtl.io import file_digest

    entry = {"descriptor": "mtl", "threshold": 0.05, "raw_threshold": 0.8,
             "normalization": {"k": 2, "beta": 1.0, "background": "folder"}, "combined": None,
             "decision": "threshold", "search": None, "target_precision": 0.9, "split": "val",
             "checkpoint": str(checkpoint), "checkpoint_digest": file_digest(checkpoint), "image_size": 112,
             "gate": True}
    path.write_text(json.dumps({"best": entry}))
    return path


@pytest.fixture
def release(imagenet_branches_checkpoint, folder_with_copies, tmp_path, monkeypatch):
    folder, _ = folder_with_copies
    examples = sorted(folder.glob("*.png"))[:3]
    points = write_points(tmp_path / "operating_points.json", imagenet_branches_checkpoint)
    written = write_release(imagenet_branches_checkpoint, points, {"profile": "test", "commit": "abc",
                                                                   "training_pictures": 12}, examples,
                            tmp_path / "release")
    monkeypatch.setenv("MTL_RELEASE", str(tmp_path / "release"))
    return written


def test_the_release_is_a_small_float16_checkpoint_with_its_card(release, imagenet_branches_checkpoint):
    checkpoint = load_checkpoint(release.checkpoint)
    assert {t.dtype for t in checkpoint["model_state"].values() if t.is_floating_point()} == {torch.float16}
    assert "optimizer" not in checkpoint and checkpoint["model_config"]
    assert release.checkpoint.stat().st_size < 0.6 * imagenet_branches_checkpoint.stat().st_size
    assert release.card["megabytes"] <= 20 and release.card["operating_points"]["best"]["checkpoint"] == "model.pt"
    assert set(release.card["examples"]) == {p.name for p in (release.directory / "examples").iterdir()}
    assert load_release(release.directory).card == release.card


def test_the_release_embeds_as_its_card_recorded(release):
    from mtl.eval.embed import embed

    examples = sorted((release.directory / "examples").iterdir())
    fresh = embed(str(release.checkpoint), examples, [p.name for p in examples], image_size=112, device="cpu",
                  num_workers=0)
    for name, vector in zip(fresh.ids, fresh.embeddings):
        assert embedding_distance(release.card["examples"][name], vector) < 1e-4


def test_a_changed_release_file_is_refused(release):
    release.checkpoint.write_bytes(release.checkpoint.read_bytes() + b"x")
    with pytest.raises(ValueError, match="does not match its card"):
        load_release(release.directory)


def test_best_is_the_pipelines_model_when_there_is_one_else_the_release(release, imagenet_branches_checkpoint,
                                                                          tmp_path):
    checkpoint, _, which = best_model(tmp_path / "no_pipeline.json")
    assert checkpoint == release.checkpoint and "released model" in which
    points = write_points(tmp_path / "pipeline.json", imagenet_branches_checkpoint)
    checkpoint, points_path, which = best_model(points)
    assert checkpoint == imagenet_branches_checkpoint and points_path == points and "pipeline" in which


def test_dedup_runs_on_the_release_without_a_trained_model(release, folder_with_copies, tmp_path, capsys):
    from mtl.dedup.cli import main

    folder, planted = folder_with_copies
    assert main([str(folder), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
                 "--operating-points", str(tmp_path / "missing.json")]) == 0
    out = capsys.readouterr().out
    assert "the released model (test profile, commit abc" in out
    groups = json.loads((tmp_path / "out" / "groups.json").read_text())
    assert groups["normalization"] == {"k": 2, "beta": 1.0, "background": "folder"}


def test_embed_best_says_which_model(release, folder_with_copies, tmp_path, capsys, monkeypatch):
    from mtl.eval.embed import main

    folder, _ = folder_with_copies
    monkeypatch.chdir(tmp_path)  # no models/ here: the release is used
    assert main(["--method", "best", "--folder", str(folder), "--out", str(tmp_path / "e.npz"), "--num-workers",
                 "0"]) == 0
    assert "--method best: the released model" in capsys.readouterr().out


@pytest.mark.skipif(not (RELEASE_DIR / "card.json").is_file(), reason="no release committed yet")
def test_the_committed_release_reproduces_its_recorded_embeddings(monkeypatch):
    from mtl.eval.embed import embed

    monkeypatch.delenv("MTL_RELEASE", raising=False)
    release = load_release(RELEASE_DIR)
    examples = sorted((RELEASE_DIR / "examples").iterdir())
    assert len(examples) == 3 and release.card["megabytes"] <= 20
    fresh = embed(str(release.checkpoint), examples, [p.name for p in examples],
                  image_size=release.card["image_size"], device="cpu", num_workers=0)
    distances = [embedding_distance(release.card["examples"][n], v) for n, v in zip(fresh.ids, fresh.embeddings)]
    assert max(distances) < 1e-3, distances
    assert np.allclose(np.linalg.norm(fresh.embeddings, axis=1), 1.0, atol=1e-4)
