"""The duplicates among a folder's images: pairs scoring at least the threshold (and,
with the class gate, of one predicted class), grouped as connected components, each
group with the file that stays (its keeper); and what a run writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mtl.dedup.cache import FolderEmbeddings
from mtl.dedup.report import write_report
from mtl.dedup.thresholds import DedupMethod
from mtl.eval.decision import same_predicted_class
from mtl.eval.search import pairs_above
from mtl.io import atomic_write_text, write_csv


PAIR_COLUMNS = ("a", "b", "score", "same_class", "kept")


def score_pairs(embedded: FolderEmbeddings, method: DedupMethod, min_score_report: float | None = None) -> pd.DataFrame:
    """Pairs scoring at least min(threshold, min_score_report), best first; `kept` marks
    the duplicates (score >= threshold, and with the gate, the same predicted class)."""
    lowest = method.threshold if min_score_report is None else min(method.threshold, min_score_report)
    i, j, scores = pairs_above(embedded.embeddings, lowest)
    kept = scores >= method.threshold
    same_class = None
    if embedded.class_probs is not None:
        same_class = same_predicted_class(embedded.class_probs[i], embedded.class_probs[j])
        kept &= same_class | (not method.gate)
    pairs = pd.DataFrame({"a": embedded.ids[i], "b": embedded.ids[j], "score": scores.astype(np.float64).round(6),
                          "same_class": pd.Series(same_class, dtype="boolean") if same_class is not None
                          else pd.Series([pd.NA] * len(i), dtype="boolean"),
                          "kept": kept})
    return pairs.sort_values(["score", "a", "b"], ascending=[False, True, True], ignore_index=True)


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other (connected by kept pairs)."""

    keeper: str                   # stays where it is
    duplicates: tuple[str, ...]   # the others: what --move-duplicates-to moves
    max_score: float
    n_pairs: int

    @property
    def members(self) -> tuple[str, ...]:
        return (self.keeper, *self.duplicates)


def file_facts(folder: Path, ids) -> pd.DataFrame:
    """width, height, pixels (from the header: no decoding), bytes, mtime of each file."""
    rows = []
    for id_ in ids:
        path = folder / id_
        try:
            with Image.open(path) as im:
                width, height = im.size
            stat = path.stat()
            rows.append((id_, width, height, width * height, stat.st_size, stat.st_mtime))
        except Exception:  # noqa: BLE001 - it was read a moment ago; a vanished file sorts last
            rows.append((id_, 0, 0, 0, 0, float("inf")))
    return pd.DataFrame(rows, columns=["id", "width", "height", "pixels", "bytes", "mtime"]).set_index("id")


def group_pairs(pairs: pd.DataFrame, facts: pd.DataFrame) -> list[DuplicateGroup]:
    """Connected components of the kept pairs, each with its keeper; highest score first."""
    kept = pairs[pairs["kept"]]
    if kept.empty:
        return []
    nodes = np.unique(np.concatenate([kept["a"], kept["b"]]))
    index = {n: k for k, n in enumerate(nodes)}
    a, b = kept["a"].map(index).to_numpy(), kept["b"].map(index).to_numpy()
    _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes),) * 2),
                                     directed=False)
    edge_label = labels[a]
    groups = []
    for label in np.unique(labels):
        members = sorted(nodes[labels == label],
                         key=lambda n: (-facts.at[n, "pixels"], facts.at[n, "mtime"], n))
        edges = kept[edge_label == label]
        groups.append(DuplicateGroup(members[0], tuple(members[1:]), float(edges["score"].max()), len(edges)))
    return sorted(groups, key=lambda g: (-g.max_score, g.keeper))


@dataclass
class DedupResult:
    folder: Path
    method: DedupMethod
    pairs: pd.DataFrame          # PAIR_COLUMNS, best first
    groups: list[DuplicateGroup]
    facts: pd.DataFrame          # file_facts of every file in a pair, plus `class` (MTL only)
    embedded: FolderEmbeddings

    def duplicates_to_remove(self) -> list[str]:
        """Every non-keeper (imagededup's find_duplicates_to_remove)."""
        return sorted(d for g in self.groups for d in g.duplicates)

    def duplicates(self) -> dict[str, list[tuple[str, float]]]:
        """{file: [(duplicate, score), ...]} over kept pairs (imagededup's find_duplicates)."""
        found: dict[str, list[tuple[str, float]]] = {}
        for a, b, score in self.pairs.loc[self.pairs["kept"], ["a", "b", "score"]].itertuples(index=False):
            found.setdefault(a, []).append((b, score))
            found.setdefault(b, []).append((a, score))
        return found

    def summary(self) -> str:
        e = self.embedded
        reasons = pd.Series(list(e.failed.values()), dtype=str).value_counts()
        unreadable = f"; {len(e.failed)} unreadable, skipped ({', '.join(f'{r}: {c}' for r, c in reasons.items())})" \
            if e.failed else ""
        speed = f" at {e.n_new / e.embed_seconds:.0f} img/s" if e.n_new and e.embed_seconds > 0 else ""
        return (f"{e.n_files} images: {e.n_new} new{speed}, {e.n_files - e.n_new} from the cache"
                f"{unreadable}\nmethod {self.method.describe()}\n"
                f"{int(self.pairs['kept'].sum())} duplicate pairs in {len(self.groups)} groups; "
                f"{len(self.duplicates_to_remove())} files are not their group's keeper")

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """pairs.csv, groups.json and report.html in `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {"pairs": out_dir / "pairs.csv", "groups": out_dir / "groups.json",
                   "report": out_dir / "report.html"}
        write_csv(self.pairs, written["pairs"], columns=list(PAIR_COLUMNS))
        atomic_write_text(written["groups"], json.dumps(self.groups_json(), indent=2) + "\n")
        write_report(self, written["report"])
        return written

    def groups_json(self) -> dict:
        m, e = self.method, self.embedded
        return {"folder": str(self.folder), "method": m.name, "descriptor": m.descriptor,
                "checkpoint": None if m.checkpoint is None else str(m.checkpoint),
                "threshold": m.threshold, "threshold_source": m.threshold_source, "gate": m.gate,
                "images": e.n_files, "new": e.n_new, "unreadable": e.failed,
                "groups": [{"keeper": g.keeper, "duplicates": list(g.duplicates), "max_score": g.max_score,
                            "pairs": g.n_pairs} for g in self.groups]}
