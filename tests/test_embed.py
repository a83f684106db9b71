"""`mtl embed`: every method through one path; unreadable images skipped and reported."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mtl.eval.baselines import hamming_from_score
from mtl.eval.embed import main, parse_method
from mtl.eval.embeddings import load_npz
from mtl.eval.images import images_in_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / "sub" / "deep.jpg")
    (folder / "broken.jpg").write_text("this is not a picture")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image extension: ignored")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mtl.model import ModelConfig, MTLNet

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    MTLNet(ModelConfig(pretrained=False)).save_checkpoint(path)
    return path


GOOD = {"img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "sub/deep.jpg"}


def test_folder_lists_images_recursively(image_folder):
    assert set(images_in_folder(image_folder).ids) == GOOD | {"broken.jpg", "empty.png"}


@pytest.mark.parametrize("method", ["phash", "dhash"])
def test_hashes_skip_bad_files_and_map_hamming_to_inner_product(image_folder, tmp_path, capsys, method):
    out = tmp_path / f"{method}.npz"
    assert main(["--method", method, "--folder", str(image_folder), "--out", str(out)]) == 0
    result = load_npz(out)
    assert set(result.ids) == GOOD
    assert dict(zip(result.failed, result.failed_reasons)) == {"broken.jpg": "not_an_image", "empty.png": "empty"}
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    assert result.embeddings.shape == (6, 64) and result.bytes_per_vector == 8
    np.testing.assert_allclose(np.abs(result.embeddings), 1 / 8)
    # inner product = 1 - 2·hamming/64, so a score maps back to the Hamming distance
    import imagehash

    hasher = getattr(imagehash, method)
    h0, h1 = (hasher(Image.open(image_folder / result.ids[i])) for i in (0, 1))
    score = float(result.embeddings[0] @ result.embeddings[1])
    assert score == pytest.approx(1 - 2 * (h0 - h1) / 64)
    assert hamming_from_score(score) == h0 - h1


def test_checkpoint_gives_embedding_class_probs_and_gap_in_one_pass(image_folder, checkpoint, tmp_path, capsys):
    out, gap_out = tmp_path / "mtl.npz", tmp_path / "gap.npz"
    code = main(["--method", str(checkpoint), "--folder", str(image_folder), "--out", str(out),
                 "--gap-out", str(gap_out), "--image-size", "32", "--batch-size", "4", "--device", "cpu"])
    assert code == 0
    mtl, gap = load_npz(out), load_npz(gap_out)
    assert set(mtl.ids) == GOOD and list(mtl.ids) == list(gap.ids)
    assert set(mtl.failed) == {"broken.jpg", "empty.png"}
    assert mtl.embeddings.shape == (6, 320) and gap.embeddings.shape == (6, 1280)
    np.testing.assert_allclose(np.linalg.norm(mtl.embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(gap.embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(mtl.class_probs.sum(axis=1), 1, atol=1e-5)
    assert list(mtl.class_names) == ["scene", "clipart"] and gap.class_probs is None
    assert mtl.images_per_second > 0 and gap.method == f"backbone_gap1280:{checkpoint}"
    assert "skipped 2" in capsys.readouterr().err


def test_same_image_gives_same_embedding_regardless_of_batch(image_folder, checkpoint):
    from mtl.eval.embed import embed

    paths = [image_folder / "img0.png", image_folder / "img1.png", image_folder / "img0.png"]
    result = embed(str(checkpoint), paths, ["a", "b", "c"], image_size=32, batch_size=2, device="cpu",
                   num_workers=0)
    np.testing.assert_allclose(result.embeddings[0], result.embeddings[2], atol=1e-5)


def test_a_checkpoint_embeds_at_its_training_size_unless_told(image_folder, checkpoint, tmp_path):
    from mtl.io import UserError
    from mtl.model import MTLNet, load_checkpoint

    trained = tmp_path / "trained.pt"
    MTLNet.from_checkpoint(checkpoint).save_checkpoint(trained, image_size=40)  # as mtl train records it
    common = ["--method", str(trained), "--folder", str(image_folder), "--batch-size", "4", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "own.npz")]) == 0
    assert main([*common, "--image-size", "40", "--out", str(tmp_path / "told.npz")]) == 0
    assert main([*common, "--image-size", "32", "--out", str(tmp_path / "other.npz")]) == 0
    own, told, other = (load_npz(tmp_path / f"{name}.npz") for name in ("own", "told", "other"))
    assert own.provenance.image_size == 40 and other.provenance.image_size == 32
    np.testing.assert_array_equal(own.embeddings, told.embeddings)
    assert "image_size" not in load_checkpoint(checkpoint)  # saved by hand: the size must be given
    with pytest.raises(UserError, match="records no training image size"):
        main(["--method", str(checkpoint), "--folder", str(image_folder), "--out", str(tmp_path / "x.npz")])


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("sift")


def _tiny_evalset(root, rng):
    """Eval splits with real files: references, copies (re-scaled, brightened) and distractors."""
    import pandas as pd
    from PIL import ImageEnhance

    for split in ("val", "test"):
        directory = root / "eval" / split
        (directory / "references").mkdir(parents=True)
        (directory / "queries").mkdir()
        refs, queries = [], []
        for i in range(6):
            img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((48, 48))
            img.save(directory / "references" / f"r{i}.png")
            refs.append({"reference_id": f"{split}r{i}", "path": f"references/r{i}.png", "class": "scene"})
            if i < 4:
                ImageEnhance.Brightness(img.resize((40, 40))).enhance(1.2).save(directory / "queries" / f"q{i}.png")
                queries.append({"query_id": f"{split}q{i}", "path": f"queries/q{i}.png", "class": "scene",
                                "reference_id": f"{split}r{i}", "transformation": "brighten",
                                "held_out": i % 2 == 0})
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(directory / "queries" / "d.png")
        queries.append({"query_id": f"{split}d", "path": "queries/d.png", "class": "scene", "reference_id": "",
                        "transformation": "none", "held_out": False})
        pd.DataFrame(refs).to_csv(directory / "references.csv", index=False)
        pd.DataFrame(queries).to_csv(directory / "queries.csv", index=False)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(corpus / f"c{i}.png")
    pd.DataFrame({"id": [f"c{i}" for i in range(8)], "path": [f"c{i}.png" for i in range(8)],
                  "split": ["train"] * 6 + ["val"] * 2}).to_csv(corpus / "manifest.csv", index=False)


def test_every_method_embeds_both_splits_and_lands_in_one_table(tmp_path, checkpoint):
    from mtl.eval.evaluation import evaluate_methods
    from mtl.eval.methods import embed_methods

    _tiny_evalset(tmp_path, np.random.default_rng(4))
    from mtl.eval.methods import CheckpointPass

    passes = [CheckpointPass(checkpoint, mtl="mtl_frozen", gap1280="backbone_gap1280", pca320="backbone_pca320"),
              CheckpointPass(checkpoint, mtl="mtl_finetune"),
              CheckpointPass(checkpoint, mtl="mtl_finetune_48px", image_size=48)]
    paths = embed_methods(tmp_path / "eval", tmp_path / "emb", passes, corpus_dir=tmp_path / "corpus",
                          pca_images=6, pca_dim=4, image_size=32, batch_size=8, device="cpu", num_workers=0)
    assert set(paths) == {"phash", "dhash", "backbone_gap1280", "backbone_pca320", "mtl_frozen", "mtl_finetune",
                          "mtl_finetune_48px"}
    assert load_npz(paths["backbone_pca320"]["test"]).dim == 4
    assert load_npz(paths["mtl_finetune_48px"]["test"]).provenance.image_size == 48
    paths = {name: paths[name] for name in ("phash", "dhash", "backbone_gap1280", "backbone_pca320", "mtl_frozen",
                                            "mtl_finetune")}
    evaluation = evaluate_methods(tmp_path / "eval", paths, k=3, betas=[0.0, 1.0], decisions_from=["mtl_finetune"],
                                  normalize=False)
    table = evaluation.table.set_index("method")
    assert list(table.index) == ["phash", "dhash", "backbone_gap1280", "backbone_pca320", "mtl_frozen",
                                 "mtl_finetune", "mtl_finetune_gate", "mtl_finetune_fusion"]
    assert table.loc["phash", "bytes_per_vector"] == 8 and table.loc["mtl_frozen", "bytes_per_vector"] == 1280
    assert table.loc["phash", "muap"] > 0.5  # brightened, re-scaled copies keep their pHash
    assert ((table["muap"] >= 0) & (table["muap"] <= 1)).all()


def assert_same_embeddings(joined, single) -> None:
    """Same ids, same order, same vectors (bit for bit), same failures."""
    for name in ("ids", "embeddings", "class_probs", "failed", "failed_reasons", "class_names"):
        ours, theirs = getattr(joined, name), getattr(single, name)
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
    assert joined.method == single.method


def test_shards_joined_equal_the_single_process_file(image_folder, checkpoint, tmp_path, capsys):
    common = ["--method", str(checkpoint), "--folder", str(image_folder), "--image-size", "32", "--batch-size", "2",
              "--num-workers", "0"]
    assert main([*common, "--out", str(tmp_path / "single.npz")]) == 0
    for i in range(3):  # 8 files in batches of 2: parts of 1, 1 and 2 batches
        assert main([*common, "--shard", f"{i}/3", "--out", str(tmp_path / "joined.npz")]) == 0
    assert "mtl embed --merge --out" in capsys.readouterr().out
    assert len(list(tmp_path.glob("joined.part-*-of-3.npz"))) == 3
    assert main(["--merge", "--out", str(tmp_path / "joined.npz")]) == 0
    assert_same_embeddings(load_npz(tmp_path / "joined.npz"), load_npz(tmp_path / "single.npz"))
    assert not list(tmp_path.glob("joined.part-*"))  # the parts are gone once joined


def test_merge_refuses_an_incomplete_set_of_parts(image_folder, tmp_path):
    assert main(["--method", "phash", "--folder", str(image_folder), "--shard", "1/2",
                 "--out", str(tmp_path / "x.npz")]) == 0
    with pytest.raises(FileNotFoundError, match=r"parts \[0\] of 2"):
        main(["--merge", "--out", str(tmp_path / "x.npz")])
    with pytest.raises(SystemExit):
        main(["--method", "phash", "--folder", str(image_folder), "--shard", "2/2", "--out", str(tmp_path / "y.npz")])
