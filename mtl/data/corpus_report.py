"""What a corpus build writes besides the images and the manifest: the contact sheets
(per class, of the near-blank rejects, per package) and report.json (counts per class
and split, rejections per reason, duplicates, MB and seconds per phase, per package)."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from mtl.data.decode import REJECTED_DIR, SourceImage
from mtl.data.manifest import SPLITS, CorpusImage, rank_key, slug
from mtl.data.sheets import contact_sheet
from mtl.data.splits import Deduplication
from mtl.io import atomic_path, atomic_write_text


# --------------------------------------------------------------------------- contact sheets

def save_image(image: Image.Image, path: Path, **options) -> None:
    """Whole or absent, like every output (mtl.io.atomic_path); format from the name."""
    with atomic_path(path) as tmp:
        image.save(tmp, **options)


def write_contact_sheets(images: list[CorpusImage], cfg) -> dict[str, str]:
    """One sheet per class, of a seeded choice of its kept images."""
    corpus_dir = Path(cfg.corpus_dir)
    sheets = {}
    for class_name in sorted({im.class_name for im in images}):
        members = sorted((im for im in images if im.class_name == class_name),
                         key=lambda im: rank_key(cfg.seed + 1, im.image_id))[:cfg.contact_sheet_images]
        name = f"contact_{slug(class_name)}.png"
        save_image(contact_sheet([corpus_dir / im.path for im in members]), corpus_dir / name)
        sheets[class_name] = name
    return sheets


def write_rejected_sheet(cfg) -> str:
    """A contact sheet of the images rejected as near blank (up to contact_sheet_images,
    seeded choice; an empty sheet when there were none)."""
    corpus_dir = Path(cfg.corpus_dir)
    thumbs = sorted((corpus_dir / REJECTED_DIR).glob("*.jpg"), key=lambda p: rank_key(cfg.seed + 1, p.stem))
    name = "contact_near_blank.png"
    save_image(contact_sheet(thumbs[:cfg.contact_sheet_images]), corpus_dir / name)
    return name


def count_table(images: list[CorpusImage], key) -> dict[str, dict[str, int]]:
    """{class: {train, val, test, total}} of key(image) counts (images or distinct groups)."""
    table: dict[str, dict[str, int]] = {}
    for class_name in sorted({im.class_name for im in images}):
        members = [im for im in images if im.class_name == class_name]
        row = {s: len({key(im) for im in members if im.split == s}) for s in SPLITS}
        row["total"] = len({key(im) for im in members})
        table[class_name] = row
    return table


def write_package_sheets(images: list[CorpusImage], cfg, per_sheet: int = 40) -> dict[str, str]:
    """One contact sheet per (package, class) of kept images: the check by eye that the
    package table's class is right."""
    corpus_dir = Path(cfg.corpus_dir)
    members: dict[tuple[str, str], list[CorpusImage]] = defaultdict(list)
    for image in images:
        members[(image.source.removeprefix("debian:"), image.class_name)].append(image)
    (corpus_dir / "contact_packages").mkdir(exist_ok=True)
    sheets = {}
    for (package, class_name), group in sorted(members.items()):
        shown = sorted(group, key=lambda im: rank_key(cfg.seed + 1, im.image_id))[:per_sheet]
        name = f"contact_packages/{slug(package)}-{class_name}.png"
        save_image(contact_sheet([corpus_dir / im.path for im in shown], columns=10, thumb=72), corpus_dir / name)
        sheets[f"{package}:{class_name}"] = name
    return sheets


# --------------------------------------------------------------------------- report.json

def disk_report(cfg, kept: list[CorpusImage], packages: dict) -> dict:
    """MB downloaded (.deb files used), unpacked, and stored (the kept images)."""
    raw = Path(cfg.raw_dir) / "unpacked"
    return {"download_mb": round(sum(p["deb_mb"] for p in packages.values()), 1),
            "unpacked_mb": round(sum(folder_megabytes(raw / name) for name in packages), 1),
            "decoded_mb": round(sum((Path(cfg.corpus_dir) / im.path).stat().st_size for im in kept) / 2**20, 1)}


def per_package(kept: list[CorpusImage], items: list[SourceImage]) -> dict[str, dict]:
    """Per source package and class: files decoded, images kept, pictures (groups) kept."""
    table: dict[str, dict] = defaultdict(lambda: {"files": 0, "images": 0, "groups": set()})
    for item in items:
        table[f"{item.source.removeprefix('debian:')}:{item.class_name}"]["files"] += 1
    for image in kept:
        row = table[f"{image.source.removeprefix('debian:')}:{image.class_name}"]
        row["images"] += 1
        row["groups"].add(image.group)
    return {key: {**row, "groups": len(row["groups"])} for key, row in sorted(table.items())}


SUBSAMPLING_REASONS = ("family_variant", "not_decoded_over_cap", "over_class_cap", "over_tile_cap",
                       "other_version", "symlink")


def make_report(cfg, kept: list[CorpusImage], dedup: Deduplication, skipped: Counter,
                timings: dict, packages: dict, sheets: dict) -> dict:
    by_split = Counter(im.split for im in kept)
    return {
        "source": cfg.source,
        "images": len(kept),
        "splits": {s: by_split[s] for s in SPLITS},
        "counts": count_table(kept, key=lambda im: im.image_id),
        "groups": count_table(kept, key=lambda im: im.group),
        "rejections": {k: v for k, v in sorted(skipped.items()) if k not in SUBSAMPLING_REASONS},
        "subsampling": {k: skipped[k] for k in SUBSAMPLING_REASONS if skipped[k]},
        "duplicates": {"exact": len(dedup.exact), "near": len(dedup.near),
                       "near_across_groups": dedup.near_across_groups},
        "build_seconds": timings["build_s"],
        "timings": timings,
        "packages": packages,
        "contact_sheets": sheets,
        "config": asdict(cfg),
    }


def summary(report: dict) -> str:
    lines = [f"corpus: {report['images']} images ({report['build_seconds']:.0f} s)"]
    for class_name, row in report["counts"].items():
        lines.append(f"  {class_name:<12} " + "  ".join(f"{s} {row[s]:>5}" for s in (*SPLITS, "total")))
    lines.append(f"  duplicates dropped: {report['duplicates']}")
    if "disk" in report:
        lines.append(f"  disk MB: {report['disk']}; sources decoded now / from the record: "
                     f"{report['decode']['decoded_now']} / {report['decode']['from_record']}")
    lines.append(f"  rejections: {report['rejections']}")
    return "\n".join(lines)


def folder_megabytes(folder: Path) -> float:
    """Bytes of the regular files under a folder, in MB (2^20)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return round(total / 2**20, 1)


# What differs between two builds of the same corpus: the clock, and how much a resumed
# build found already decoded.  Kept out of report.json so that the corpus folder (a DVC
# output every later stage depends on) has the same content hash after every rebuild.
RUN_KEYS = ("build_seconds", "timings", "decode")


def build_log_path(corpus_dir: Path) -> Path:
    """The last build's times and decode counts: beside the corpus folder, not in it."""
    return corpus_dir.parent / f"{corpus_dir.name}.build.json"


def write_report(report: dict, corpus_dir: Path) -> None:
    content = {k: v for k, v in report.items() if k not in RUN_KEYS}
    atomic_write_text(corpus_dir / "report.json", json.dumps(content, indent=1) + "\n")
    run = {k: report[k] for k in RUN_KEYS if k in report}
    atomic_write_text(build_log_path(corpus_dir), json.dumps(run, indent=1) + "\n")


def read_report(corpus_dir: Path) -> dict:
    """report.json with the last build's times and decode counts, when they are recorded."""
    report = json.loads((corpus_dir / "report.json").read_text())
    log = build_log_path(corpus_dir)
    return {**report, **json.loads(log.read_text())} if log.is_file() else report
