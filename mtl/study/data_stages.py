"""The data stages of the pipeline: `corpus` and `evalset` (notebooks/corpus.ipynb,
notebooks/evalset.ipynb).  Each stage writes results/<stage>/metrics.json (with its wall time) and its figures;
`mtl.report` gathers them into results/metrics.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from mtl.data.corpus import build_corpus
from mtl.data.evalset import build_evalset
from mtl.data.sheets import side_by_side
from mtl.io import atomic_path, write_json
from mtl.runtime import stopwatch
from mtl.scale_report import package_overview

RESULTS = Path("results")


def corpus_stage(params: dict, results_dir: str | Path = RESULTS / "corpus") -> dict:
    """Build the corpus; write the per-class contact sheets side by side and the counts."""
    results_dir = Path(results_dir)
    with stopwatch() as timing:
        report = build_corpus(params["data"])
    corpus_dir = Path(params["data"]["corpus_dir"])
    combined = side_by_side([Image.open(corpus_dir / name) for name in report["contact_sheets"].values()])
    with atomic_path(results_dir / "contact_sheets.png") as tmp:
        combined.save(tmp, optimize=True)
    with atomic_path(results_dir / "near_blank.png") as tmp:
        shutil.copyfile(corpus_dir / report["near_blank_sheet"], tmp)
    if report.get("package_sheets"):
        package_overview(corpus_dir, results_dir / "packages.png")
    metrics = {key: report[key] for key in ("images", "splits", "counts", "groups", "rejections", "duplicates",
                                            "timings", "disk", "decode", "per_package") if key in report}
    metrics["wall_seconds"] = timing["seconds"]
    write_json(results_dir / "metrics.json", metrics)
    return report


def evalset_stage(params: dict, results_dir: str | Path = RESULTS / "evalset") -> dict:
    results_dir = Path(results_dir)
    corpus_dir = Path(params["data"]["corpus_dir"])
    eval_dir = Path(params["evalset"]["dir"])
    with stopwatch() as timing:
        summary = build_evalset(corpus_dir / "manifest.csv", corpus_dir, eval_dir, params["evalset"])
    with atomic_path(results_dir / "gallery.png") as tmp:
        shutil.copyfile(eval_dir / "gallery.png", tmp)
    metrics = {"splits": summary["splits"], "transformations": len(summary["transformations"]),
               "held_out_transformations": len(summary["held_out"]), "wall_seconds": timing["seconds"]}
    write_json(results_dir / "metrics.json", metrics)
    return summary
