"""Figures of the study.  Each function takes data, draws one figure, writes a
PNG and returns its path; the notebooks only call these."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless under papermill / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from PIL import Image  # noqa: E402

from mtl.io import atomic_path  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def loss_curves(log: pd.DataFrame, title: str, path: str | Path) -> Path:
    """Train vs. validation loss per branch (the paper's Fig. 3 / Fig. 4):
    contrastive (embedding branch), cross-entropy (classification branch), total."""
    panels = [("contrastive", "embedding branch: contrastive"),
              ("cross_entropy", "classification branch: cross-entropy"),
              ("total", "multi-task total")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, panels):
        for split, style in (("train", "-o"), ("val", "--s")):
            column = f"{split}_{key}"
            if column in log:
                ax.plot(log["epoch"], log[column], style, label=split)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def projections(panels: Mapping[str, np.ndarray], group: np.ndarray, is_anchor: np.ndarray,
                path: str | Path, title: str = "") -> Path:
    """2-D projections side by side (the paper's Fig. 5): colour = anchor,
    stars = anchors, dots = their transformed views."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    palette = sns.color_palette("husl", len(np.unique(group)))
    colour_of = {g: palette[i] for i, g in enumerate(np.unique(group))}
    colours = [colour_of[g] for g in group]
    for ax, (name, xy) in zip(axes[0], panels.items()):
        views = ~is_anchor
        ax.scatter(xy[views, 0], xy[views, 1], c=[colours[i] for i in np.flatnonzero(views)], s=14, alpha=0.8)
        ax.scatter(xy[is_anchor, 0], xy[is_anchor, 1], c=[colours[i] for i in np.flatnonzero(is_anchor)],
                   s=140, marker="*", edgecolors="black", linewidths=0.6)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# One look per method, the same in every panel: a distinct colour and line style each.
_LOOKS = [("tab:gray", ":"), ("tab:brown", "-."), ("tab:blue", "--"), ("tab:orange", "-"), ("tab:green", "-"),
          ("tab:red", "--"), ("tab:purple", "-."), ("tab:olive", ":"), ("tab:cyan", "-"), ("black", "--")]


def pr_curves(panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: str | Path,
              title: str = "") -> Path:
    """Precision–recall curves pooled over all queries (μAP's curve), one panel per entry
    of `panels` ({panel title: {method: (recall, precision)}}, methods in the order of the
    table); a method keeps its colour and line style in every panel."""
    names = list(dict.fromkeys(name for curves in panels.values() for name in curves))
    if len(names) > len(_LOOKS):
        raise ValueError(f"{len(names)} methods in one figure: at most {len(_LOOKS)} can be told apart")
    looks = dict(zip(names, _LOOKS))
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), sharey=True, squeeze=False)
        for ax, (panel, curves) in zip(axes[0], panels.items()):
            for name, (recall, precision) in curves.items():
                colour, style = looks[name]
                ax.plot(recall, precision, label=name, color=colour, linestyle=style, lw=1.8)
            ax.axhline(0.9, color="grey", lw=0.8, ls=":")
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel("recall (all ground-truth pairs)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("precision (all queries pooled)")
        axes[0][-1].legend(fontsize=8, loc="lower left")
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        return _save(fig, path)


def bar_chart(frame: pd.DataFrame, x: str, y: str, hue: str | None, path: str | Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(frame)), 4))
    sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax)
    ax.tick_params(axis="x", rotation=60)
    ax.set_title(title)
    return _save(fig, path)


def image_pairs(pairs: Sequence[tuple[str | Path, str | Path, str]], path: str | Path, title: str = "") -> Path:
    """Query / reference pairs side by side.  Each row has its caption (e.g. score and
    transformation) on a line of its own above the pair, and short "query" / "reference"
    labels over the two images, so long captions never run into each other."""
    n = max(1, len(pairs))
    fig, axes = plt.subplots(n, 2, figsize=(5.0, 2.6 * n), squeeze=False)
    fig.subplots_adjust(hspace=0.6, wspace=0.08)
    for ax in axes.ravel():
        ax.axis("off")
    for row, (query, reference, caption) in enumerate(pairs):
        for col, (label, image_path) in enumerate((("query", query), ("reference", reference))):
            ax = axes[row, col]
            ax.set_title(label, fontsize=7, loc="left", pad=2)
            if image_path is None or not Path(image_path).is_file():
                continue
            with Image.open(image_path) as img:
                ax.imshow(img.convert("RGB"))
        axes[row, 0].annotate(caption, xy=(0.0, 1.0), xycoords="axes fraction", xytext=(0, 14),
                              textcoords="offset points", fontsize=7.5, ha="left", va="bottom",
                              annotation_clip=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def diagnosis(active: pd.DataFrame, staleness: pd.DataFrame, path: str | Path) -> Path:
    """Left: share of compared negatives inside the margin, per step, one line per
    (margin, memory) run.  Right: age and drift of the memory's entries over a run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for (margin, memory), run in active.groupby(["margin", "memory_size"]):
        smooth = run["active_share"].rolling(20, min_periods=1).mean()
        left.plot(run["step"], smooth.clip(lower=1e-7), label=f"margin {margin}, memory {memory:,}", lw=1.2)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("active negatives / compared (20-step mean)")
    left.legend(fontsize=7)
    right.plot(staleness["step"], staleness["mean_age"], label="mean age of stored entries (steps)")
    right.plot(staleness["step"], staleness["mean_age_active"], label="mean age of active negatives (steps)")
    right.set_xlabel("step")
    right.set_ylabel("age (steps)")
    twin = right.twinx()
    twin.plot(staleness["step"], staleness["mean_drift"], "k--", label="mean drift (1 - cos), right axis")
    twin.set_ylabel("drift: 1 - cos(stored, current)")
    lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper left")
    return _save(fig, path)


def memory_probe(probe: pd.DataFrame, path: str | Path, smooth: int = 5) -> Path:
    """The memory probe (mtl.memory_study) over a stage-1 run, one line per run (memory size
    and momentum): how bunched the batch is, where it sits against the memory, and where the
    gradient on the anchors comes from.  `probe` carries each run's `label`
    (mtl.memory_study.with_run_names)."""
    panels = [("mean_norm", "|mean of the batch's embeddings|"),
              ("batch_similarity", "mean cosine, different pictures in the batch"),
              ("memory_alignment", "cos(batch mean, memory mean)"),
              ("share_from_memory", "active negatives from the memory / all active"),
              ("grad", "mean gradient norm on an anchor"),
              ("grad_angle", "angle between memory and batch gradients (°)")]
    with plt.style.context("default"):
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        colours = dict(zip(probe["label"].unique(), ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]))
        for ax, (column, title) in zip(axes.ravel(), panels):
            for label, run in probe.groupby("label", sort=False):
                colour = colours[label]
                if column == "grad":
                    ax.plot(run["step"], run["grad_memory"].rolling(smooth, min_periods=1).mean(), color=colour,
                            label=f"{label}: from memory negatives")
                    ax.plot(run["step"], run["grad_batch"].rolling(smooth, min_periods=1).mean(), color=colour,
                            linestyle="--", label=f"{label}: from batch negatives")
                else:
                    ax.plot(run["step"], run[column].rolling(smooth, min_periods=1).mean(), color=colour, label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Stage 1 with and without the cross-batch memory ({smooth}-record means)")
        fig.tight_layout()
        return _save(fig, path)


def learning_curve(table: pd.DataFrame, baseline: dict, path: str | Path) -> Path:
    """μAP against the number of training pictures (log scale), val and test, with the
    ImageNet backbone's 1280-d output as a dashed line of each (matplotlib's own style)."""
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for split, colour in (("val", "tab:blue"), ("test", "tab:orange")):
            stages = " + ".join(sorted(set(table["stages"]))) if "stages" in table else "frozen+finetune"
            ax.plot(table["train_pictures"], table[f"muap_{split}"], "o-", color=colour,
                    label=f"best recipe ({stages}), {split}")
            ax.axhline(baseline[f"muap_{split}"], color=colour, linestyle="--", linewidth=1,
                       label=f"ImageNet 1280-d, {split}")
        ax.set_xscale("log")
        ax.set_xlabel("training pictures")
        ax.set_ylabel("μAP")
        ax.set_title("Learning curve: same epochs per picture, same evaluation sets")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
