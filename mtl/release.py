"""The released model: the full profile's `best` two-stage checkpoint, shipped with the
package so that `mtl dedup FOLDER` works right after set-up, with no training run.

    mtl/release/model.pt     the checkpoint, float16 weights (loaded as float32)
    mtl/release/card.json    how it was made and how it decides: profile, commit, the
                             training pictures, val and test numbers, its operating point
                             (threshold, normalization, combined decision) and the image size
    mtl/release/examples/    three small images and (in the card) their recorded embeddings,
                             which a test compares after loading

Who uses it: `mtl dedup`, and `mtl embed` with `--method best`, take the pipeline's trained
model when there is one (models/operating_points.json names it) and this one otherwise;
both say which.  Only the full profile writes it (`python -m mtl.release write`, after
`make repro PROFILE=full`); `--out` writes your own elsewhere, and `MTL_RELEASE=DIR` makes
the tools use it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.io import atomic_path, atomic_write_text, file_digest
from mtl.model import load_checkpoint

RELEASE_DIR = Path(__file__).parent / "release"
CHECKPOINT_NAME = "model.pt"
CARD_NAME = "card.json"
MAX_MEGABYTES = 20


def release_dir() -> Path:
    """Where the released model lives: MTL_RELEASE, else the package's own folder."""
    return Path(os.environ.get("MTL_RELEASE") or RELEASE_DIR)


@dataclass(frozen=True)
class Release:
    """A released model: its checkpoint and card."""

    directory: Path
    card: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    @property
    def operating_points_path(self) -> Path:
        """The card's operating points as a file `mtl dedup` reads (written beside the card)."""
        return self.directory / "operating_points.json"

    def describe(self) -> str:
        card = self.card
        return (f"the released model ({card.get('profile')} profile, commit {card.get('commit')}, "
                f"{card.get('training_pictures', '?'):,} training pictures; {self.directory})")


def load_release(directory: str | Path | None = None) -> Release | None:
    """The release in `directory` (default: release_dir()), or None when there is none."""
    directory = Path(directory) if directory is not None else release_dir()
    card_path, checkpoint = directory / CARD_NAME, directory / CHECKPOINT_NAME
    if not card_path.is_file() or not checkpoint.is_file():
        return None
    card = json.loads(card_path.read_text())
    if card.get("checkpoint_digest") and file_digest(checkpoint) != card["checkpoint_digest"]:
        raise ValueError(f"{checkpoint} does not match its card ({card_path}): the file was changed; "
                         "write the release again with `python -m mtl.release write`")
    return Release(directory, card)


def half_checkpoint(source: Path, target: Path) -> Path:
    """The model of `source` with float16 weights, its config and image size, nothing else
    (no optimizer, memory or history): what a user needs to embed."""
    checkpoint = load_checkpoint(source)
    state = {name: value.half() if value.is_floating_point() else value
             for name, value in checkpoint["model_state"].items()}
    slim = {"model_config": checkpoint["model_config"], "model_state": state,
            "image_size": checkpoint.get("image_size", (checkpoint.get("stage_config") or {}).get("image_size")),
            "stage_config": checkpoint.get("stage_config"), "git_revision": checkpoint.get("git_revision")}
    with atomic_path(target) as tmp:
        torch.save(slim, tmp)
    megabytes = target.stat().st_size / 2**20
    if megabytes > MAX_MEGABYTES:
        raise ValueError(f"{target} is {megabytes:.1f} MB, over the {MAX_MEGABYTES} MB a release may take")
    return target


def example_embeddings(checkpoint: Path, examples: list[Path], image_size: int) -> dict[str, list[float]]:
    """The released model's embeddings of the example images (the card records them; a
    test checks a fresh load against them)."""
    from mtl.eval.embed import embed

    result = embed(str(checkpoint), examples, [p.name for p in examples], image_size=image_size, batch_size=8,
                   device="cpu", num_workers=0)
    return {name: [round(float(v), 6) for v in row] for name, row in zip(result.ids, result.embeddings)}


def write_release(checkpoint: Path, operating_points: Path, card: dict[str, Any], examples: list[Path],
                  out_dir: Path | None = None) -> Release:
    """Write a release: the float16 checkpoint, the example images, the card (with the
    'best' operating point pointing at the released file) and its operating points file."""
    out_dir = Path(out_dir) if out_dir is not None else release_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    released = half_checkpoint(checkpoint, out_dir / CHECKPOINT_NAME)
    (out_dir / "examples").mkdir(exist_ok=True)
    copied = []
    for example in examples:
        target = out_dir / "examples" / example.name
        shutil.copyfile(example, target)
        copied.append(target)
    points = json.loads(Path(operating_points).read_text())
    if "best" not in points:
        raise ValueError(f"{operating_points} has no 'best' entry: run the full profile's evaluate stage first")
    best = {**points["best"], "checkpoint": CHECKPOINT_NAME, "checkpoint_digest": file_digest(released)}
    image_size = int(best.get("image_size") or 112)
    card = {**card, "checkpoint": CHECKPOINT_NAME, "checkpoint_digest": best["checkpoint_digest"],
            "megabytes": round(released.stat().st_size / 2**20, 2), "image_size": image_size,
            "operating_points": {"best": best},
            "examples": example_embeddings(released, copied, image_size)}
    atomic_write_text(out_dir / CARD_NAME, json.dumps(card, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out_dir / "operating_points.json", json.dumps({"best": best}, indent=1) + "\n")
    return Release(out_dir, card)


def embedding_distance(a: list[float], b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - b).max())


CARD_METHODS = ("best_finetune", "best_finetune_norm", "best_finetune_160px", "best_finetune_160px_norm",
                "backbone_gap1280", "backbone_gap1280_norm")
CARD_KEYS = ("muap", "recall_at_p90", "acc_at_1", "muap_held_out", "muap_photo", "muap_clipart", "fp_at_threshold")
EXAMPLES = ("docs/demo/launch_pad_sunset.jpg", "docs/demo/copies/launch_pad_sunset_caption.jpg", "docs/demo/ladybug.png")


def profile_card(profile: str, params: dict, results: Path, checkpoint: Path) -> dict[str, Any]:
    """The card's facts, read from a finished profile run (results/profiles/<profile>/) and
    its parameters: the commit, the training pictures, the test numbers of the evaluation,
    and the val numbers of the released checkpoint itself."""
    import pandas as pd

    from mtl.eval.evaluation import EvalConfig, checkpoint_scores
    from mtl.runtime import git_revision

    corpus = json.loads((results / "corpus" / "metrics.json").read_text())
    methods = pd.read_csv(results / "evaluate" / "methods.csv").set_index("method")
    test = {m: {k: _plain(methods.at[m, k]) for k in CARD_KEYS if k in methods.columns}
            for m in CARD_METHODS if m in methods.index}
    val = checkpoint_scores(checkpoint, params["evalset"]["dir"], "val", EvalConfig.from_params(params["eval"]))["mtl"]
    run = json.loads((results / "run.json").read_text()) if (results / "run.json").is_file() else {}
    return {"profile": profile, "commit": git_revision(), "trained_from": str(checkpoint),
            "training_pictures": int(sum(c["train"] for c in corpus["counts"].values())),
            "corpus_images": int(corpus["images"]), "packages": params["data"]["packages"],
            "recipe": "best", "backbone": params["model"]["backbone"], "image_size": params["train"]["image_size"],
            "profile_wall_seconds": run.get("wall_seconds"),
            "val": {k: _plain(v) for k, v in val.items()}, "test": test,
            "test_split": f"{params['evalset']['dir']}/test ({params['evalset']['test']['references']} general + "
                          f"{params['evalset']['photos']['test']['references']} photo references)"}


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def best_model(operating_points: str | Path = Path("models/operating_points.json")) -> tuple[Path, Path, str]:
    """(checkpoint, its operating points file, which model it is) of `--method best`: the
    pipeline's trained model when models/operating_points.json names one that exists,
    else the released model; FileNotFoundError when there is neither."""
    points_path = Path(operating_points)
    if points_path.is_file():
        entry = json.loads(points_path.read_text()).get("best") or {}
        checkpoint = entry.get("checkpoint")
        for candidate in ([] if not checkpoint else [Path(checkpoint), points_path.parent.parent / checkpoint]):
            if candidate.is_file():
                return candidate, points_path, f"the pipeline's trained model ({candidate})"
    release = load_release()
    if release is not None:
        return release.checkpoint, release.operating_points_path, release.describe()
    raise FileNotFoundError(f"no trained model: {points_path} names none and no release is installed "
                            f"({release_dir()}); train one with `make repro`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.release", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the release's card")
    info.add_argument("--dir", type=Path, default=None)
    write = commands.add_parser("write", help="write the release from a finished profile run (the full profile's)")
    write.add_argument("--profile", default="full", help="the profile whose `best` model is released (default full)")
    write.add_argument("--params", default="params.yaml")
    write.add_argument("--examples", type=Path, nargs=3, default=[Path(p) for p in EXAMPLES],
                       help="three small images whose embeddings the card records")
    write.add_argument("--out", type=Path, default=None, help=f"default {RELEASE_DIR}")
    args = parser.parse_args(argv)
    if args.command == "info":
        release = load_release(args.dir)
        print("no release" if release is None else json.dumps(release.card, indent=1))
        return 0
    from mtl.params import load_params

    params = load_params(args.params, [], f"profiles/{args.profile}.yaml")
    models = Path(params["pipeline"]["models"])
    checkpoint = models / "best" / "finetune" / "final.pt"
    card = profile_card(args.profile, params, Path("results") / "profiles" / args.profile, checkpoint)
    release = write_release(checkpoint, models / "operating_points.json", card, list(args.examples), args.out)
    print(f"wrote {release.checkpoint} ({release.card['megabytes']} MB) and its card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
