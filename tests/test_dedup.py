"""`mtl dedup`: planted copies found and distinct photographs left alone, bad files
skipped, embeddings cached by content, and moves that never lose or overwrite a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl.dedup import find_duplicates
from mtl.dedup.cache import FolderEmbeddings
from mtl.dedup.cli import main
from mtl.dedup.groups import score_pairs
from mtl.dedup.thresholds import DedupSetupError, resolve_method
from mtl.eval.operating_points import load_operating_points
from mtl.io import file_digest
from mtl.release import load_release


def kept_pairs(result) -> set[frozenset[str]]:
    kept = result.pairs[result.pairs["kept"]]
    return {frozenset(p) for p in zip(kept["a"], kept["b"])}


def checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_operating_points(path: Path, **entries) -> Path:
    path.write_text(json.dumps(entries))
    return path


def best_entry(checkpoint: Path, threshold: float = 0.8, **changes) -> dict:
    digest = file_digest(checkpoint) if checkpoint.is_file() else None
    return {"descriptor": "mtl", "threshold": threshold, "target_precision": 0.9, "split": "val",
            "checkpoint": str(checkpoint), "checkpoint_digest": digest, "image_size": 112, "gate": True, **changes}


# --------------------------------------------------------------------------- finding

def test_phash_finds_the_planted_copies_and_keeps_the_originals(folder_with_copies, tmp_path):
    folder, planted = folder_with_copies
    result = find_duplicates(folder, method="phash", cache_dir=tmp_path / "cache",
                             operating_points=tmp_path / "none.json")
    assert kept_pairs(result) == planted
    assert result.method.threshold == 1 - 2 * 10 / 64  # imagededup's default radius, 10 bits
    assert result.pairs["same_class"].isna().all()     # hashes predict no class
    assert {g.keeper for g in result.groups} == {min(p, key=len) for p in planted}  # the older originals
    assert sorted(result.duplicates_to_remove()) == sorted(max(p, key=len) for p in planted)
    assert set(result.duplicates()) == set().union(*planted)


def test_trained_checkpoint_with_its_operating_point(folder_with_copies, imagenet_branches_checkpoint, tmp_path):
    folder, planted = folder_with_copies
    points = write_operating_points(tmp_path / "operating_points.json",
                                    best=best_entry(imagenet_branches_checkpoint))
    result = find_duplicates(folder, cache_dir=tmp_path / "cache", operating_points=points,
                             min_score_report=0.5)
    assert result.method.descriptor == "mtl" and result.method.gate
    assert "operating_points.json" in result.method.threshold_source
    assert kept_pairs(result) == planted
    assert result.pairs["same_class"].notna().all()
    assert (result.pairs["score"] < 0.8).any()  # near misses are listed, not kept
    assert set(result.facts["class"]) == {"scene"}
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # the only new file, unreadable
    again = find_duplicates(folder, cache_dir=tmp_path / "cache", operating_points=points)
    assert again.embedded.n_new == 1 and again.embedded.failed == {"broken.png": "not_an_image"}
    assert kept_pairs(again) == planted


def test_class_gate_drops_pairs_whose_predicted_classes_differ():
    unit = np.array([[1.0, 0.0], [0.99, np.sqrt(1 - 0.99**2)], [1.0, 0.0]], np.float32)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], np.float32)  # image 1 is predicted otherwise
    embedded = FolderEmbeddings(np.array(["a.jpg", "b.jpg", "c.jpg"]), unit, probs, ("scene", "clipart"),
                                {}, 3, 0, 0.0)
    gated = resolve_method("phash")  # a method with a threshold; swap in the MTL descriptor
    from dataclasses import replace

    gated = replace(gated, descriptor="mtl", threshold=0.9, gate=True)
    pairs = score_pairs(embedded, gated).set_index(["a", "b"])
    assert pairs.loc[("a.jpg", "c.jpg"), "kept"] and pairs.loc[("a.jpg", "c.jpg"), "same_class"]
    assert not pairs.loc[("a.jpg", "b.jpg"), "kept"] and not pairs.loc[("a.jpg", "b.jpg"), "same_class"]
    ungated = score_pairs(embedded, replace(gated, gate=False))
    assert ungated["kept"].all()


def test_bad_files_are_counted_and_skipped(awkward_images, small_real_photos, tmp_path, capsys):
    folder, expected, _ = awkward_images
    small_real_photos["rocket"].save(folder / "rocket.png")
    code = main([str(folder), "--method", "phash", "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "cache"), "--operating-points", str(tmp_path / "none.json")])
    assert code == 0
    groups = json.loads((tmp_path / "out" / "groups.json").read_text())
    bad = {name: reason for name, reason in expected.items() if reason and not name.endswith(".svg")}
    assert groups["unreadable"] == bad
    assert f"{len(bad)} unreadable, skipped" in capsys.readouterr().out
    # every readable variant of the same photograph (CMYK, 16-bit, transparent, ...) is found
    readable = {name for name, reason in expected.items() if reason is None}
    assert set().union(*[{g["keeper"], *g["duplicates"]} for g in groups["groups"]]) <= readable


def test_rerun_embeds_nothing_new_and_an_added_file_embeds_one(folder_with_copies, small_real_photos, tmp_path):
    folder, _ = folder_with_copies
    run = dict(method="phash", cache_dir=tmp_path / "cache", operating_points=tmp_path / "none.json")
    first = find_duplicates(folder, **run)
    assert first.embedded.n_new == first.embedded.n_files == 10
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    again = find_duplicates(folder, **run)
    assert again.embedded.n_new == 1 and again.embedded.failed == {"broken.jpg": "not_an_image"}
    assert find_duplicates(folder, **run).embedded.n_new == 0  # a bad file is remembered too
    small_real_photos["flower"].rotate(90, expand=True).save(folder / "sub" / "new.png")
    grown = find_duplicates(folder, **run)
    assert grown.embedded.n_new == 1 and grown.embedded.n_files == 12
    renamed = folder / "copies" / "renamed.jpg"
    (folder / "copies" / "chelsea_jpeg.jpg").rename(renamed)
    assert find_duplicates(folder, **run).embedded.n_new == 0  # keyed by content, not by name
    assert find_duplicates(folder, **{**run, "method": "dhash"}).embedded.n_new == 12  # and by model


def test_outputs_are_written_and_the_report_is_self_contained(folder_with_copies, tmp_path):
    folder, planted = folder_with_copies
    out = tmp_path / "out"
    assert main([str(folder), "--method", "phash", "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--operating-points", str(tmp_path / "none.json")]) == 0
    pairs = pd.read_csv(out / "pairs.csv")
    assert list(pairs.columns) == ["a", "b", "score", "cosine", "hamming", "same_class", "kept", "why"]
    assert set(pairs["why"]) == {"embedding"}  # a hash is the method here: its score decides
    assert {frozenset(p) for p in zip(pairs["a"], pairs["b"])} == planted
    groups = json.loads((out / "groups.json").read_text())
    assert groups["threshold"] == pytest.approx(0.6875) and len(groups["groups"]) == 3
    report = (out / "report.html").read_text()
    assert "http://" not in report and "https://" not in report and "data:image/jpeg;base64," in report
    assert "default-src 'none'" in report  # the browser may fetch nothing


# --------------------------------------------------------------------------- methods and operating points

def test_operating_points_missing_or_malformed(tmp_path, imagenet_branches_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("MTL_RELEASE", str(tmp_path / "no_release"))  # neither a trained nor a released model
    missing = tmp_path / "missing.json"
    with pytest.raises(DedupSetupError, match="make repro"):
        resolve_method("best", missing)
    assert main([str(tmp_path), "--operating-points", str(missing)]) == 2
    message = capsys.readouterr().err.strip()
    assert "make repro" in message and "--method imagenet" in message and "\n" not in message
    with pytest.raises(DedupSetupError, match="needs --threshold"):
        resolve_method("imagenet", missing)
    assert resolve_method("imagenet", missing, threshold=0.8).threshold == 0.8
    with pytest.raises(DedupSetupError, match="pass --threshold"):
        resolve_method(str(imagenet_branches_checkpoint), missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DedupSetupError, match="broken.json is not valid JSON"):
        resolve_method("phash", broken)
    with pytest.raises(ValueError, match="lacks \\['threshold'\\]"):
        load_operating_points(write_operating_points(tmp_path / "bad.json", best={"descriptor": "mtl"}))


def test_operating_points_entries(tmp_path, imagenet_branches_checkpoint, monkeypatch):
    monkeypatch.setenv("MTL_RELEASE", str(tmp_path / "no_release"))  # no released model to fall back on
    ckpt = imagenet_branches_checkpoint
    points = write_operating_points(
        tmp_path / "ops.json", best=best_entry(ckpt, 0.83), phash={"descriptor": "phash", "threshold": 0.625},
        imagenet={"descriptor": "gap1280", "threshold": 0.78, "image_size": 128})
    best = resolve_method("best", points)
    assert (best.threshold, best.gate, best.checkpoint, best.image_size) == (0.83, True, ckpt, 112)
    assert resolve_method("best", points, gate=False).gate is False
    assert resolve_method(str(ckpt), points).threshold == 0.83  # found by the checkpoint's digest
    assert resolve_method("phash", points).threshold == 0.625
    imagenet = resolve_method("imagenet", points)
    assert (imagenet.descriptor, imagenet.checkpoint, imagenet.image_size) == ("gap1280", None, 128)
    stale = write_operating_points(tmp_path / "stale.json", best=best_entry(ckpt, checkpoint_digest="0" * 16))
    with pytest.raises(DedupSetupError, match="changed since its threshold was chosen"):
        resolve_method("best", stale)
    moved = write_operating_points(tmp_path / "moved.json", best=best_entry(tmp_path / "gone.pt"))
    with pytest.raises(DedupSetupError, match="gone.pt .*is missing.*make repro"):
        resolve_method("best", moved)
    monkeypatch.delenv("MTL_RELEASE")
    release = load_release()
    if release is not None:  # with the released model installed, a missing pipeline model falls back on it
        fallback = resolve_method("best", moved)
        assert fallback.checkpoint == release.checkpoint and "released" in fallback.model_note


def test_a_checkpoint_without_an_entry_runs_at_its_training_size(tmp_path, imagenet_branches_checkpoint):
    from mtl.model import MTLNet

    missing = tmp_path / "none.json"
    assert resolve_method(str(imagenet_branches_checkpoint), missing, threshold=0.8).image_size == 112
    assert resolve_method(str(imagenet_branches_checkpoint), missing, threshold=0.8, image_size=96).image_size == 96
    other = tmp_path / "other.pt"
    MTLNet.from_checkpoint(imagenet_branches_checkpoint).save_checkpoint(other, image_size=64)
    assert resolve_method(str(other), missing, threshold=0.8).image_size == 64
    bare = tmp_path / "bare.pt"
    MTLNet.from_checkpoint(imagenet_branches_checkpoint).save_checkpoint(bare)
    with pytest.raises(DedupSetupError, match="records no training image size"):
        resolve_method(str(bare), missing, threshold=0.8)


def normalized_entry(checkpoint: Path, **changes) -> dict:
    entry = {"threshold": 0.05, "raw_threshold": 0.8, "normalization": {"k": 2, "beta": 1.0, "background": "folder"},
             "combined": {"hamming_radius": 6, "threshold": 0.2}}
    return best_entry(checkpoint, **{**entry, **changes})


def test_scores_are_normalized_by_the_folder_unless_raw(folder_with_copies, imagenet_branches_checkpoint, tmp_path):
    from mtl.eval.normalize import Normalization, folder_densities

    folder, planted = folder_with_copies
    points = write_operating_points(tmp_path / "ops.json", best=normalized_entry(imagenet_branches_checkpoint))
    run = {"cache_dir": tmp_path / "cache", "operating_points": points, "min_score_report": -1.0}
    result = find_duplicates(folder, **run)
    assert result.method.normalization == Normalization(2, 1.0, "folder") and result.method.threshold == 0.05
    assert "normalized (β=1, k=2" in result.summary()
    rho = dict(zip(result.embedded.ids, folder_densities(result.embedded.embeddings, Normalization(2, 1.0, "folder"))))
    pairs = result.pairs
    expected = pairs["cosine"] - (pairs["a"].map(rho) + pairs["b"].map(rho)) / 2
    np.testing.assert_allclose(pairs["score"], expected, atol=1e-5)
    assert (pairs["kept"] == ((pairs["score"] >= 0.05) & pairs["same_class"])).all()
    raw = find_duplicates(folder, raw=True, **run)
    assert raw.method.normalization is None and raw.method.threshold == 0.8
    np.testing.assert_allclose(raw.pairs["score"], raw.pairs["cosine"])
    assert kept_pairs(raw) == planted


def test_the_combined_decision_keeps_hash_matches_and_says_why(folder_with_copies, imagenet_branches_checkpoint,
                                                                 tmp_path):
    folder, planted = folder_with_copies
    entry = normalized_entry(imagenet_branches_checkpoint, threshold=5.0, decision="combined")
    entry["combined"]["threshold"] = 5.0  # no embedding score passes: only the hashes decide
    points = write_operating_points(tmp_path / "ops.json", best=entry)
    result = find_duplicates(folder, cache_dir=tmp_path / "cache", operating_points=points)
    assert result.method.hamming_radius == 6 and "or pHash within 6 bits" in result.method.describe()
    kept = result.pairs[result.pairs["kept"]]
    assert set(kept["why"]) == {"hash"} and (kept["hamming"] <= 6).all()
    phash = find_duplicates(folder, method="phash", threshold=1 - 2 * 6 / 64, cache_dir=tmp_path / "cache",
                            operating_points=tmp_path / "none.json")
    assert kept_pairs(result) == kept_pairs(phash)
    alone = find_duplicates(folder, cache_dir=tmp_path / "cache", operating_points=points, decision="threshold")
    assert alone.method.hamming_radius is None and alone.method.threshold == 5.0 and not alone.pairs["kept"].any()
    with pytest.raises(DedupSetupError, match="drop --raw"):
        resolve_method("best", write_operating_points(tmp_path / "ops2.json",
                                                      best=normalized_entry(imagenet_branches_checkpoint)),
                       raw=True, decision="combined")


def test_groups_do_not_chain_through_a_member():
    from mtl.dedup.groups import chain_merges, group_pairs

    # big matches mid, mid matches small, big and small do not match; other pair x-y apart
    facts = pd.DataFrame({"pixels": [400, 300, 200, 100, 50], "mtime": [0.0] * 5},
                         index=["big", "mid", "small", "x", "y"])
    pairs = pd.DataFrame({"a": ["big", "mid", "x"], "b": ["mid", "small", "y"], "score": [0.9, 0.8, 0.7],
                          "kept": [True, True, True]})
    groups = group_pairs(pairs, facts)
    assert [(g.keeper, g.duplicates) for g in groups] == [("big", ("mid",)), ("x", ("y",))]
    chains = chain_merges(pairs, groups)  # chained, small would have joined big's group
    assert (chains.components, chains.merged_groups, chains.left_out, chains.largest_component) == (2, 0, 1, 3)
    # a chain big-mid-small-x: two groups here, one under the chain rule
    pairs = pd.DataFrame({"a": ["big", "mid", "small"], "b": ["mid", "small", "x"], "score": [0.9, 0.8, 0.7],
                          "kept": [True, True, True]})
    groups = group_pairs(pairs, facts)
    assert [(g.keeper, g.duplicates) for g in groups] == [("big", ("mid",)), ("small", ("x",))]
    chains = chain_merges(pairs, groups)
    assert (chains.components, chains.merged_groups, chains.left_out, chains.largest_component) == (1, 2, 0, 4)
    # a file matching two keepers joins the better one; a member's own matches stay its own
    pairs = pd.DataFrame({"a": ["big", "mid", "small"], "b": ["x", "x", "y"], "score": [0.9, 0.95, 0.6],
                          "kept": [True, True, True]})
    groups = group_pairs(pairs, facts)
    assert sorted((g.keeper, g.duplicates) for g in groups) == [("big", ("x",)), ("small", ("y",))]


# --------------------------------------------------------------------------- moving aside, and back

def dedup_cli(folder: Path, tmp_path: Path, *extra: str) -> int:
    return main([str(folder), "--method", "phash", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
                 "--operating-points", str(tmp_path / "none.json"), *extra])


def test_dry_run_moves_nothing_then_apply_and_undo_restore_every_file(folder_with_copies, tmp_path):
    folder, planted = folder_with_copies
    (folder / "empty.jpg").write_bytes(b"")  # bad files stay where they are
    before = checksums(folder)
    aside = tmp_path / "aside"
    assert dedup_cli(folder, tmp_path, "--move-duplicates-to", str(aside)) == 0
    assert checksums(folder) == before and not aside.exists() and not (tmp_path / "out" / "moves.csv").exists()

    assert dedup_cli(folder, tmp_path, "--move-duplicates-to", str(aside), "--apply") == 0
    copies = sorted(max(p, key=len) for p in planted)
    assert sorted(checksums(aside)) == copies  # mirrored: copies/<name>
    assert checksums(aside) == {c: before[c] for c in copies}
    assert set(checksums(folder)) == set(before) - set(copies)
    moves = pd.read_csv(tmp_path / "out" / "moves.csv")
    assert len(moves) == len(copies)

    assert main(["--undo", str(tmp_path / "out" / "moves.csv")]) == 0
    assert checksums(folder) == before  # byte-identical, every file
    assert not any(aside.rglob("*"))   # the mirrored sub-folders are gone again
    assert (tmp_path / "out" / "moves.csv.undone").is_file()


def test_moving_refuses_to_overwrite(folder_with_copies, tmp_path, capsys):
    folder, _ = folder_with_copies
    before = checksums(folder)
    aside = tmp_path / "aside"
    (aside / "copies").mkdir(parents=True)
    (aside / "copies" / "coffee_blur.jpg").write_bytes(b"someone else's file")
    assert dedup_cli(folder, tmp_path, "--move-duplicates-to", str(aside), "--apply") == 1
    assert "exists (never overwritten)" in capsys.readouterr().err
    assert checksums(folder) == before and (aside / "copies" / "coffee_blur.jpg").read_bytes() == b"someone else's file"
    assert not (tmp_path / "out" / "moves.csv").exists()


def test_destination_inside_the_folder_is_refused(folder_with_copies, tmp_path, capsys):
    folder, _ = folder_with_copies
    before = checksums(folder)
    assert dedup_cli(folder, tmp_path, "--move-duplicates-to", str(folder / "dups"), "--apply") == 2
    assert "would be found again" in capsys.readouterr().err
    assert checksums(folder) == before


def test_undo_refuses_an_occupied_original_path_and_a_changed_file(folder_with_copies, tmp_path, capsys):
    folder, _ = folder_with_copies
    aside = tmp_path / "aside"
    assert dedup_cli(folder, tmp_path, "--move-duplicates-to", str(aside), "--apply") == 0
    moves_csv = tmp_path / "out" / "moves.csv"
    (folder / "copies" / "coffee_blur.jpg").write_bytes(b"new file at the old place")
    (aside / "copies" / "rocket_sharpen.jpg").write_bytes(b"edited after the move")
    moved = checksums(aside)
    assert main(["--undo", str(moves_csv)]) == 1
    err = capsys.readouterr().err
    assert "coffee_blur.jpg is occupied" in err and "rocket_sharpen.jpg changed since it was moved" in err
    assert checksums(aside) == moved and moves_csv.is_file()  # nothing moved back
