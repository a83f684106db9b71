"""Data at scale: the README's tables for the full package set, the corpus build's disk and
time, a profile's results beside the default ones, and the learning curve.

A profile's numbers are kept under ``results/profiles/<name>/`` (the pipeline writes every
profile's results to the same paths, so they are copied aside once a run finishes):

    python -m mtl.scale_report save-profile full          # after `make repro PROFILE=full`
    python -m mtl.scale_report corpus data/corpus_full    # a corpus built by hand (`mtl corpus`)

`mtl.report` writes the tables below into the README with every other table.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pandas as pd
from PIL import Image

from mtl.data.corpus_report import read_report
from mtl.data.manifest import rank_key, read_manifest
from mtl.data.packages import PACKAGES, read_listing
from mtl.data.sheets import side_by_side, thumbnail_grid
from mtl.tables import HEADLINE_COLUMNS, RETRIEVAL_COLUMNS, fmt, markdown_table, split_normalized, stage_rank

RESULTS = Path("results")
PROFILE_FILES = ("corpus/metrics.json", "corpus/contact_sheets.png", "corpus/packages.png", "evaluate/methods.csv",
                 "evaluate/folder.csv", "evaluate/backgrounds.csv", "evaluate/pr_curves.png", "evalset/metrics.json",
                 "metrics.json")
PROFILE_FOLDERS = ("timing", "report_timing")  # every stage's wall time (scripts/stage)


# --------------------------------------------------------------------------- corpus summaries

def corpus_metrics(report: dict) -> dict:
    """What results/<...>/corpus/metrics.json keeps of a corpus build's report.json."""
    keys = ("images", "splits", "counts", "groups", "rejections", "subsampling", "duplicates", "timings", "disk",
            "decode", "per_package")
    return {key: report[key] for key in keys if key in report}


def package_overview(corpus_dir: Path, out_png: Path, per_row: int = 12, thumb: int = 44) -> Path:
    """One small sheet: a row of seeded thumbnails per (package, class), labelled."""
    members = defaultdict(list)
    for row in read_manifest(corpus_dir / "manifest.csv"):
        members[(row["source"].removeprefix("debian:"), row["class"])].append(row)
    ordered = sorted(members.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    label, pad = 230, 2
    labels = [((4, pad + r * (thumb + pad) + thumb // 2 - 6), f"{class_name}: {package} ({len(rows):,})", "black")
              for r, ((package, class_name), rows) in enumerate(ordered)]
    shown = [[corpus_dir / row["path"] for row in sorted(rows, key=lambda m: rank_key(1, m["id"]))[:per_row]]
             for _, rows in ordered]
    sheet = thumbnail_grid(shown, thumb, (thumb + pad, thumb + pad), (label, pad),
                           (label + per_row * (thumb + pad), len(ordered) * (thumb + pad) + pad), "white",
                           labels=labels)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256).save(out_png, optimize=True)
    return out_png


def save_corpus(corpus_dir: Path, out_dir: Path) -> Path:
    """metrics.json, packages.png and contact_sheets.png of a built corpus, under out_dir."""
    report = read_report(corpus_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(corpus_metrics(report), indent=2, sort_keys=True) + "\n")
    package_overview(corpus_dir, out_dir / "packages.png")
    combined = side_by_side([Image.open(corpus_dir / name) for name in report["contact_sheets"].values()])
    combined.quantize(256).save(out_dir / "contact_sheets.png", optimize=True)
    return out_dir


def save_profile(name: str, results_dir: Path = RESULTS) -> Path:
    """Copy the pipeline's current results of a profile to results/profiles/<name>/."""
    out = results_dir / "profiles" / name
    for rel in PROFILE_FILES:
        if (results_dir / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(results_dir / rel, out / rel)
    for folder in PROFILE_FOLDERS:
        if (results_dir / folder).is_dir():
            shutil.rmtree(out / folder, ignore_errors=True)
            shutil.copytree(results_dir / folder, out / folder)
    return out


# --------------------------------------------------------------------------- tables

def packages_table(corpus: dict) -> str:
    """Per package and class: the table's reason, files decoded, images and pictures kept."""
    reasons, photos = defaultdict(list), set()
    for row in PACKAGES:
        reasons[f"{row.package}:{row.class_name}"].append(row.reason)
        if row.photo:
            photos.add(row.package)
    rows = []
    for key, counts in corpus.get("per_package", {}).items():
        package, class_name = key.rsplit(":", 1)
        kind = f"{class_name} (photographs)" if package in photos else class_name
        listed = read_listing(f"{package}.txt") if package in photos else {}
        rows.append({"package": package, "class": kind, **counts, "listed": len(set(listed.values())) or None,
                     "reason": "; ".join(reasons.get(key, ["(not in the table)"]))})
    rows.sort(key=lambda r: (r["class"], -r["images"]))
    columns = [("package", "package"), ("class", "class"), ("listed", "photographs listed"),
               ("files", "files decoded"), ("images", "images kept"), ("groups", "pictures"),
               ("reason", "why this class")]
    return markdown_table(rows, columns)


def build_table(corpus: dict) -> str:
    """Disk and time of a corpus build, per phase."""
    disk, timings = corpus.get("disk", {}), corpus.get("timings", {})
    minutes = lambda key: round(timings[key] / 60, 1) if key in timings else None  # noqa: E731
    rows = [
        {"phase": "download (.deb files)", "mb": disk.get("download_mb"), "minutes": minutes("download_s")},
        {"phase": "unpack (dpkg-deb -x)", "mb": disk.get("unpacked_mb"), "minutes": minutes("unpack_s")},
        {"phase": "find the source files", "mb": float("nan"), "minutes": minutes("discover_s")},
        {"phase": "decode, tile, store (kept images)", "mb": disk.get("decoded_mb"), "minutes": minutes("decode_s")},
        {"phase": "duplicates, splits, outputs", "mb": float("nan"),
         "minutes": round((timings.get("dedup_split_s", 0) + timings.get("outputs_s", 0)) / 60, 1)},
        {"phase": "**whole build**", "mb": float("nan"), "minutes": minutes("build_s")},
    ]
    return markdown_table(rows, [("phase", "phase"), ("mb", "MB"), ("minutes", "minutes")])


def counts_table(corpus: dict) -> str:
    """Images (and pictures) per class and split."""
    counts, groups = corpus.get("counts", {}), corpus.get("groups", {})
    rows = []
    for class_name, row in counts.items():
        pictures = groups.get(class_name, {})
        rows.append({"class": class_name, **{s: f"{fmt(row[s])} ({fmt(pictures.get(s))})" for s in row}})
    return markdown_table(rows, [("class", "class"), ("train", "train"), ("val", "val"), ("test", "test"),
                                 ("total", "total")])


def learning_curve_table(results_dir: Path, name: str = "learning_curve") -> str | None:
    """results/<name>/table.csv (mtl.learning_curve) with its ImageNet baseline row."""
    table = results_dir / name / "table.csv"
    if not table.is_file():
        return None
    rows = pd.read_csv(table).to_dict("records")
    baseline = results_dir / name / "baseline.json"
    if baseline.is_file():
        rows.append({"train_pictures": "ImageNet 1280-d", **json.loads(baseline.read_text())})
    columns = [("train_pictures", "training pictures"), ("muap_val", "μAP val"), ("muap_test", "μAP test"),
               ("acc1_test", "acc@1 test"), ("recall_at_p90_test", "R@P90 test"), ("stages", "stages trained"),
               ("wall_seconds", "wall s")]
    return markdown_table(rows, [c for c in columns if c[0] != "stages" or "stages" in rows[0]])


HEADLINE_PROFILE_METHODS = ("phash", "backbone_gap1280", "best_finetune", "best_finetune_160px")


def profiles_table(results_dir: Path, methods: tuple[str, ...] | None = None, headline: bool = False) -> str | None:
    """The default profile's and the full profile's retrieval, side by side: every method
    of the full profile (each raw and normalized), or the headline methods only."""
    sources = {"default": results_dir / "evaluate" / "methods.csv",
               "full": results_dir / "profiles" / "full" / "evaluate" / "methods.csv"}
    if not sources["full"].is_file():
        return None
    full_methods = list(pd.read_csv(sources["full"])["method"])
    wanted = [m for m in full_methods if methods is None or split_normalized(m)[0] in methods]
    rows = []
    for profile, path in sources.items():
        if path.is_file():
            frame = pd.read_csv(path).set_index("method")
            for method in wanted:
                if method in frame.index:
                    base, scale = split_normalized(method)
                    rows.append({"profile": profile, **frame.loc[method].to_dict(), "method": f"`{base}`",
                                 "scale": scale})
    keys = ("method", "scale", "muap", "recall_at_p90", "acc_at_1", "muap_photo", "muap_clipart") if headline else \
        ("method", "scale", "muap", "recall_at_p90", "acc_at_1", "muap_held_out", "acc_at_1_held_out", "muap_photo",
         "recall_at_p90_photo", "muap_clipart", "fp_at_threshold")
    columns = [("profile", "profile"), *[c for c in HEADLINE_COLUMNS + RETRIEVAL_COLUMNS if c[0] in keys]]
    return markdown_table(rows, list(dict.fromkeys(columns)))


def profile_timing_table(results_dir: Path, name: str = "full") -> str | None:
    """A saved profile's wall time per stage, as it ran (results/profiles/<name>/timing/)."""
    folder = results_dir / "profiles" / name
    records = [*(folder / "timing").glob("*.json"), *(folder / "report_timing").glob("*.json")]
    if not records:
        return None
    rows = sorted((json.loads(p.read_text()) for p in records), key=lambda r: stage_rank(r["stage"]))
    rows = [{"stage": r["stage"], "minutes": r["wall_seconds"] / 60, "started": r.get("started")} for r in rows]
    rows.append({"stage": "**all stages**", "minutes": sum(r["minutes"] for r in rows)})
    return markdown_table(rows, [("stage", "stage"), ("started", "started"), ("minutes", "minutes")])


def scale_tables(results_dir: Path = RESULTS) -> dict[str, str]:
    """Every data-at-scale table whose numbers exist."""
    tables = {}
    corpus_json = results_dir / "profiles" / "full" / "corpus" / "metrics.json"
    if corpus_json.is_file():
        corpus = json.loads(corpus_json.read_text())
        tables.update(packages_full=packages_table(corpus), corpus_build_full=build_table(corpus),
                      corpus_full=counts_table(corpus))
    for name, table in (("learning_curve", learning_curve_table(results_dir)),
                        ("learning_curve_mem0", learning_curve_table(results_dir, "learning_curve_mem0")),
                        ("learning_curve_momentum", learning_curve_table(results_dir, "learning_curve_momentum")),
                        ("retrieval_profiles", profiles_table(results_dir)),
                        ("retrieval_profiles_headline", profiles_table(results_dir, HEADLINE_PROFILE_METHODS, True)),
                        ("timing_full", profile_timing_table(results_dir))):
        if table is not None:
            tables[name] = table
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.scale_report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save-profile", help="copy the current results to results/profiles/NAME/")
    s.add_argument("name")
    c = sub.add_parser("corpus", help="summarize a corpus built by hand into results/profiles/NAME/corpus/")
    c.add_argument("corpus_dir")
    c.add_argument("--profile", default="full")
    args = parser.parse_args(argv)
    if args.cmd == "save-profile":
        print(f"wrote {save_profile(args.name)}")
    else:
        print(f"wrote {save_corpus(Path(args.corpus_dir), RESULTS / 'profiles' / args.profile / 'corpus')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
