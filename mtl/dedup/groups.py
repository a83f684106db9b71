"""The duplicates among a folder's images: pairs scoring at least the threshold (normalized
by each image's density in the folder unless --raw; with the class gate, of one predicted
class; with the combined decision, also pairs whose pHashes are within the radius), grouped
around a keeper; and what a run writes.

Groups without chaining.  Connected components chain: A matches B, B matches C, and A
and C land in one group though they never matched, so one hub can gather a crowd of false
matches.  Here every member of a group matches its keeper itself: files are taken in
keeper order (the most pixels, then the oldest, then the name); each file not yet in a
group becomes the keeper of its not-yet-grouped matches.  A file that matches only a
member of another group stays out.  `chain_merges` counts what the chain rule would have
merged."""

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
from mtl.eval.folder import hamming_of_scores, hash_score
from mtl.eval.normalize import SCORE_ROUNDING, folder_densities, normalized_pairs_above
from mtl.eval.search import pairs_above
from mtl.io import atomic_write_text, write_csv


PAIR_COLUMNS = ("a", "b", "score", "cosine", "hamming", "same_class", "kept", "why")


def score_pairs(embedded: FolderEmbeddings, method: DedupMethod, min_score_report: float | None = None,
                hashes: FolderEmbeddings | None = None) -> pd.DataFrame:
    """Pairs scoring at least min(threshold, min_score_report), best first, on the method's
    scale (`score`; the raw similarity is `cosine`), plus, for the combined decision, every
    pair whose pHashes (`hashes`, the same files in the same order) are within the radius.
    `kept` marks the duplicates: score >= threshold (with the gate, of one predicted class),
    or a hash match; `why` says which (embedding, hash or both)."""
    lowest = method.threshold if min_score_report is None else min(method.threshold, min_score_report)
    x = embedded.embeddings
    densities = None
    if method.normalization is not None and method.normalization.beta > 0:
        densities = folder_densities(x, method.normalization)
        i, j, _ = normalized_pairs_above(x, densities, method.normalization.beta, lowest)
    else:
        i, j, _ = pairs_above(x, lowest)
    hamming = None
    if method.hamming_radius is not None:
        if hashes is None or not np.array_equal(hashes.ids, embedded.ids):
            raise ValueError("the combined decision needs the pHashes of the same files, in the same order")
        hi, hj, _ = pairs_above(hashes.embeddings, hash_score(method.hamming_radius))
        joined = np.unique(np.concatenate([i * len(x) + j, hi * len(x) + hj]))
        i, j = joined // len(x), joined % len(x)
        hamming = hamming_of_scores(np.einsum("ij,ij->i", hashes.embeddings[i], hashes.embeddings[j]))
    cosine = np.einsum("ij,ij->i", x[i], x[j]).astype(np.float64)
    scores = cosine if densities is None else method.normalization.apply(cosine, densities[i], densities[j])
    by_embedding = scores >= method.threshold - (SCORE_ROUNDING if densities is not None else 0.0)
    same_class = None
    if embedded.class_probs is not None:
        same_class = same_predicted_class(embedded.class_probs[i], embedded.class_probs[j])
        by_embedding &= same_class | (not method.gate)
    by_hash = hamming <= method.hamming_radius if hamming is not None else np.zeros(len(i), bool)
    why = np.where(by_embedding & by_hash, "both", np.where(by_embedding, "embedding", np.where(by_hash, "hash", "")))
    pairs = pd.DataFrame({"a": embedded.ids[i], "b": embedded.ids[j], "score": scores.round(6),
                          "cosine": cosine.round(6),
                          "hamming": pd.Series(hamming, dtype="Int64") if hamming is not None
                          else pd.Series([pd.NA] * len(i), dtype="Int64"),
                          "same_class": pd.Series(same_class, dtype="boolean") if same_class is not None
                          else pd.Series([pd.NA] * len(i), dtype="boolean"),
                          "kept": by_embedding | by_hash, "why": why})
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


def keeper_order(nodes, facts: pd.DataFrame) -> list[str]:
    """Who keeps first: the most pixels, then the oldest file, then the name."""
    return sorted(nodes, key=lambda n: (-facts.at[n, "pixels"], facts.at[n, "mtime"], n))


def group_pairs(pairs: pd.DataFrame, facts: pd.DataFrame) -> list[DuplicateGroup]:
    """Groups around keepers, without chaining (the module docstring); highest score first."""
    kept = pairs[pairs["kept"]]
    if kept.empty:
        return []
    matches: dict[str, dict[str, float]] = {}
    for a, b, score in kept[["a", "b", "score"]].itertuples(index=False):
        matches.setdefault(a, {})[b] = score
        matches.setdefault(b, {})[a] = score
    grouped: set[str] = set()
    groups = []
    for keeper in keeper_order(matches, facts):
        if keeper in grouped:
            continue
        members = [m for m in keeper_order(matches[keeper], facts) if m not in grouped]
        if not members:
            continue  # every match of this file already belongs to a better keeper
        grouped.update([keeper, *members])
        scores = [matches[keeper][m] for m in members]
        inside = sum(1 for m in members for n in members if m < n and n in matches[m])
        groups.append(DuplicateGroup(keeper, tuple(members), float(max(scores)), len(members) + inside))
    return sorted(groups, key=lambda g: (-g.max_score, g.keeper))


@dataclass(frozen=True)
class ChainMerges:
    """What connected components (the chain rule) would have made of the same kept pairs."""

    components: int               # groups under the chain rule
    merged_groups: int             # of our groups, those sharing a component with another
    left_out: int                  # files in a kept pair but in no group (they match no keeper)
    largest_component: int


def chain_merges(pairs: pd.DataFrame, groups: list[DuplicateGroup]) -> ChainMerges:
    kept = pairs[pairs["kept"]]
    if kept.empty:
        return ChainMerges(0, 0, 0, 0)
    nodes = np.unique(np.concatenate([kept["a"], kept["b"]]))
    index = {n: k for k, n in enumerate(nodes)}
    a, b = kept["a"].map(index).to_numpy(), kept["b"].map(index).to_numpy()
    n_components, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes),) * 2),
                                                directed=False)
    component_of_group = [labels[index[g.keeper]] for g in groups]
    per_component = pd.Series(component_of_group).value_counts()
    grouped = {m for g in groups for m in g.members}
    return ChainMerges(int(n_components), int(per_component[per_component > 1].sum()),
                       int(sum(n not in grouped for n in nodes)), int(np.bincount(labels).max()))


@dataclass
class DedupResult:
    folder: Path
    method: DedupMethod
    pairs: pd.DataFrame          # PAIR_COLUMNS, best first
    groups: list[DuplicateGroup]
    facts: pd.DataFrame          # file_facts of every file in a pair, plus `class` (MTL only)
    embedded: FolderEmbeddings
    model_note: str = ""         # which model decided (the pipeline's or the released one)

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

    @property
    def chains(self) -> ChainMerges:
        return chain_merges(self.pairs, self.groups)

    def summary(self) -> str:
        e = self.embedded
        reasons = pd.Series(list(e.failed.values()), dtype=str).value_counts()
        unreadable = f"; {len(e.failed)} unreadable, skipped ({', '.join(f'{r}: {c}' for r, c in reasons.items())})" \
            if e.failed else ""
        speed = f" at {e.n_new / e.embed_seconds:.0f} img/s" if e.n_new and e.embed_seconds > 0 else ""
        return (f"{e.n_files} images: {e.n_new} new{speed}, {e.n_files - e.n_new} from the cache"
                f"{unreadable}\nmethod {self.method.describe()}\n"
                f"{int(self.pairs['kept'].sum())} duplicate pairs in {len(self.groups)} groups; "
                f"{len(self.duplicates_to_remove())} files are not their group's keeper"
                f"{self._chain_note()}")

    def _chain_note(self) -> str:
        chains = self.chains
        if not chains.merged_groups and not chains.left_out:
            return ""
        return (f"\n(chaining pairs would have merged {chains.merged_groups} of these groups into "
                f"{chains.components - (len(self.groups) - chains.merged_groups)} and pulled in "
                f"{chains.left_out} files that match no keeper)")

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
        chains = self.chains
        return {"folder": str(self.folder), "method": m.name, "descriptor": m.descriptor,
                "checkpoint": None if m.checkpoint is None else str(m.checkpoint),
                "model": self.model_note,
                "threshold": m.threshold, "threshold_source": m.threshold_source, "scale": m.scale,
                "normalization": None if m.normalization is None else m.normalization.as_dict(),
                "hamming_radius": m.hamming_radius, "gate": m.gate,
                "images": e.n_files, "new": e.n_new, "unreadable": e.failed,
                "chain_rule": {"components": chains.components, "merged_groups": chains.merged_groups,
                               "left_out_files": chains.left_out, "largest_component": chains.largest_component},
                "groups": [{"keeper": g.keeper, "duplicates": list(g.duplicates), "max_score": g.max_score,
                            "pairs": g.n_pairs} for g in self.groups]}
