"""All methods on the same evaluation set, one table.

The `evaluate` stage (mtl.study.evaluation_stages.evaluate_stage) embeds every method of the comparison
(mtl.eval.methods.embed_methods), then

    evaluation = evaluate_methods("data/eval", paths, decisions_from=("paper_finetune", "best_finetune"))
    evaluation.save("results/evaluate")          # methods.csv, per_transformation.csv,
                                                 # pr_curves.csv, fusion_beta.csv, metrics.json

For the figures: `evaluation.pr_curve_arrays()`, `evaluation.per_transformation`,
`evaluation.worst_false_positives(n, method)` and `evaluation.missed_copies(n, method)`.

Rows, in the order given; each embedding method is followed by its normalized row, and
each method named in `decisions_from` by its decision rows, raw and normalized:
    <method>_gate            drop matches whose predicted classes differ
    <method>_fusion          score − β·P(classes differ), β tuned on val
    <method>_norm            scores normalized by local density (mtl.eval.normalize), the
                             references as background, k and β chosen on val
    <method>_norm_gate, <method>_norm_fusion   the decisions on the normalized scale
A hash gets a normalized row only when val chooses a normalization for it (β > 0).

Columns: muap, recall_at_p90, acc_at_1 (test split); muap_held_out, acc_at_1_held_out
(copies made by held-out transformations, plus all distractors); per part of the eval set,
each part's queries searched in the whole (mixed) gallery: muap_photo, recall_at_p90_photo,
acc_at_1_photo, fp_photo (the photo part: real photographs, their copies and photo
distractors) and muap_clipart, recall_at_p90_clipart (clip-art queries); fp_at_threshold and
tp_at_threshold at `threshold`, chosen on the val split for the target precision;
bytes_per_vector; dim; images_per_second (embedding, end to end with decoding);
search_ms_per_query (exact faiss search over the test references); n_failed_images; beta
(fusion rows); norm_k, norm_beta (normalized rows).

Every number is on the test split; val only chooses the thresholds, β and the normalization.
`compare_backgrounds` measures the normalization's backgrounds (the references against a
fixed set of training pictures) side by side.
:func:`checkpoint_scores` scores one checkpoint on one split (val): how diagnostics and
recipe choices are made.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from mtl.eval.baselines import HASH_METHODS
from mtl.eval.decision import (DEFAULT_BETAS, apply_fusion, apply_gate, attach_class_agreement,
                               tune_fusion_beta)
from mtl.eval.embed import embed_many
from mtl.eval.embeddings import EmbeddingResult, load_npz
from mtl.eval.images import images_in_evalset
from mtl.eval.metrics import (PrecisionRecallCurve, count_ground_truth, false_positives_at, held_out_metrics,
                              label_predictions, micro_average_precision, precision_recall_curve,
                              recall_by_transformation, retrieval_metrics, subset_metrics,
                              threshold_for_precision)
from mtl.eval.methods import SPLITS
from mtl.eval.normalize import (BETA_GRID, K_GRID, Normalization, choose_parameters, collection_densities,
                                densities_from_top, normalized_top_k, top_similarities)
from mtl.eval.search import predictions_table, search
from mtl.io import atomic_write_text, write_csv
from mtl.params import section_config

METRIC_KEYS = ("muap", "recall_at_p90", "acc_at_1", "muap_held_out", "acc_at_1_held_out", "fp_at_threshold",
               "threshold", "bytes_per_vector", "norm_k", "norm_beta", "muap_photo", "recall_at_p90_photo",
               "acc_at_1_photo", "fp_photo", "muap_clipart", "recall_at_p90_clipart")


@dataclass(frozen=True)
class EvalConfig:
    """The `eval` section of params.yaml: how every method is embedded and scored."""

    image_size: int            # the models' input size
    larger_image_size: int     # the best model is also evaluated at this size
    batch_size: int
    top_k: int                 # neighbours searched per query
    target_precision: float    # the operating threshold is chosen on val for this precision
    device: str                # "auto" = CUDA when present, else CPU
    norm_k_grid: Sequence[int]       # similarity normalization (mtl.eval.normalize): the neighbours k
    norm_beta_grid: Sequence[float]  # and the weights β tried on val
    background_images: int           # training pictures of the fixed background

    @classmethod
    def from_params(cls, section: Mapping[str, Any]) -> "EvalConfig":
        return section_config(cls, section, "eval")


@dataclass(frozen=True)
class EvalSplit:
    """One split of the evaluation set: its tables, with paths made absolute."""

    name: str
    directory: Path
    references: pd.DataFrame  # reference_id, path, class
    queries: pd.DataFrame     # query_id, path, class, reference_id, transformation, held_out

    @classmethod
    def load(cls, eval_dir: str | Path, split: str) -> "EvalSplit":
        directory = Path(eval_dir) / split
        tables = {}
        for name in ("references", "queries"):
            path = directory / f"{name}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: build the eval set first (mtl evalset)")
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            table["path"] = [str(directory / p) for p in table["path"]]
            tables[name] = table
        queries = tables["queries"]
        queries["reference_id"] = queries["reference_id"].replace("", np.nan)
        return cls(split, directory, tables["references"], queries)

    @property
    def n_ground_truth(self) -> int:
        return count_ground_truth(self.queries)


# --------------------------------------------------------------------------- evaluation

@dataclass
class _Run:
    """One method on one split: what search returned, labelled."""

    predictions: pd.DataFrame
    search_ms_per_query: float
    embeddings: EmbeddingResult


def _search_split(result: EmbeddingResult, split: EvalSplit, k: int) -> _Run:
    references, queries = result.role("reference"), result.role("query")
    found = search(queries.embeddings, queries.ids, references.embeddings, references.ids, k=k)
    return _Run(label_predictions(found.predictions, split.queries), found.ms_per_query, result)


def _normalized_split(result: EmbeddingResult, split: EvalSplit, k: int, normalization: Normalization,
                      background: np.ndarray | None = None) -> _Run:
    """The split searched on the normalized scale (exact), labelled."""
    references, queries = result.role("reference"), result.role("query")
    start = time.perf_counter()
    rho_q, rho_r = collection_densities(queries.embeddings, references.embeddings, normalization, background)
    scores, rows = normalized_top_k(queries.embeddings, rho_q, references.embeddings, rho_r,
                                    normalization.beta, k)
    ms_per_query = 1000 * (time.perf_counter() - start) / max(len(queries.ids), 1)
    predictions = predictions_table(queries.ids, references.ids, scores, rows)
    return _Run(label_predictions(predictions, split.queries), ms_per_query, result)


def choose_normalization(val: EmbeddingResult, split: EvalSplit, k: int, ks=K_GRID, betas=BETA_GRID,
                         background: np.ndarray | None = None) -> tuple[Normalization, pd.DataFrame]:
    """k and β with the highest val μAP (mtl.eval.normalize.choose_parameters), the
    references as background, or `background` (a fixed set) when given."""
    references, queries = val.role("reference"), val.role("query")
    kmax = max(ks)
    if background is None:
        top_q = top_similarities(queries.embeddings, references.embeddings, kmax)
        top_r = top_similarities(references.embeddings, references.embeddings, kmax, exclude_self=True)
    else:
        top_q = top_similarities(queries.embeddings, background, kmax)
        top_r = top_similarities(references.embeddings, background, kmax)

    def val_muap(normalization: Normalization) -> float:
        scores, rows = normalized_top_k(queries.embeddings, densities_from_top(top_q, normalization.k),
                                        references.embeddings, densities_from_top(top_r, normalization.k),
                                        normalization.beta, k)
        predictions = label_predictions(predictions_table(queries.ids, references.ids, scores, rows), split.queries)
        return micro_average_precision(predictions, split.n_ground_truth)

    return choose_parameters(val_muap, ks, betas, "references" if background is None else "fixed")


def _class_agreement(run: _Run) -> pd.DataFrame:
    emb = run.embeddings
    if emb.class_probs is None:
        raise ValueError(f"{emb.method} has no class probabilities: gate and fusion need a checkpoint")
    refs, queries = emb.role("reference"), emb.role("query")
    return attach_class_agreement(run.predictions, queries.ids, queries.class_probs,
                                  refs.ids, refs.class_probs)


@dataclass
class MethodsEvaluation:
    """The side-by-side comparison; see the module docstring."""

    table: pd.DataFrame
    per_transformation: pd.DataFrame
    pr_curves: dict[str, PrecisionRecallCurve]
    test_predictions: dict[str, pd.DataFrame]
    test_split: EvalSplit
    fusion_grid: pd.DataFrame = field(default_factory=pd.DataFrame)
    normalization_grid: pd.DataFrame = field(default_factory=pd.DataFrame)

    def metrics_dict(self) -> dict[str, dict[str, float]]:
        """{method: {muap, recall_at_p90, acc_at_1, fp_at_threshold, bytes_per_vector}}:
        results/evaluate/metrics.json, gathered as `retrieval.<method>`."""
        return {row["method"]: {key: _plain(row[key]) for key in METRIC_KEYS if key in row}
                for row in self.table.to_dict("records")}

    def pr_curve_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{method: (recall, precision)}: the input of mtl.plots.pr_curves."""
        return {name: (c.recall, c.precision) for name, c in self.pr_curves.items()}

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {"methods": out_dir / "methods.csv", "per_transformation": out_dir / "per_transformation.csv",
                   "pr_curves": out_dir / "pr_curves.csv", "metrics": out_dir / "metrics.json"}
        curves = [c.to_frame().assign(method=name) for name, c in self.pr_curves.items()]
        tables = {"methods": self.table, "per_transformation": self.per_transformation,
                  "pr_curves": pd.concat(curves, ignore_index=True)}
        if not self.fusion_grid.empty:
            written["fusion_beta"] = out_dir / "fusion_beta.csv"
            tables["fusion_beta"] = self.fusion_grid
        if not self.normalization_grid.empty:
            written["normalization_grid"] = out_dir / "normalization_grid.csv"
            tables["normalization_grid"] = self.normalization_grid
        for name, table in tables.items():
            write_csv(table, written[name])
        atomic_write_text(written["metrics"], json.dumps(self.metrics_dict(), indent=2, sort_keys=True) + "\n")
        return written

    def _paths(self) -> tuple[dict[str, str], dict[str, str]]:
        split = self.test_split
        return (dict(zip(split.queries["query_id"], split.queries["path"])),
                dict(zip(split.references["reference_id"], split.references["path"])))

    def worst_false_positives(self, n: int = 8, method: str = "best_finetune") -> pd.DataFrame:
        """The n highest-scored wrong matches of `method` on test, with image paths."""
        predictions = self._predictions(method)
        wrong = predictions[~predictions["correct"]].nlargest(n, "score")
        query_path, reference_path = self._paths()
        truth = self.test_split.queries.set_index("query_id")
        return wrong.assign(
            query_path=wrong["query_id"].map(query_path),
            reference_path=wrong["reference_id"].map(reference_path),
            true_reference_id=wrong["query_id"].map(truth["reference_id"]),
            transformation=wrong["query_id"].map(truth["transformation"]),
            source_group=wrong["query_id"].map(truth["source_group"]) if "source_group" in truth else np.nan,
        ).reset_index(drop=True)

    def missed_copies(self, n: int = 8, method: str = "best_finetune") -> pd.DataFrame:
        """Copies whose reference is not the best match of `method`, worst first
        (not retrieved at all, then lowest score of the true pair)."""
        predictions = self._predictions(method)
        queries = self.test_split.queries
        positives = queries[queries["reference_id"].notna()]
        ranked = predictions.sort_values(["score", "correct"], ascending=[False, True], kind="stable")
        top1 = ranked.drop_duplicates("query_id").set_index("query_id")
        true_score = predictions[predictions["correct"]].set_index("query_id")["score"]
        missed = positives[~positives["query_id"].map(top1["correct"]).fillna(False).astype(bool)]
        query_path, reference_path = self._paths()
        out = pd.DataFrame({
            "query_id": missed["query_id"], "reference_id": missed["reference_id"],
            "transformation": missed["transformation"],
            "true_score": missed["query_id"].map(true_score),
            "top1_reference_id": missed["query_id"].map(top1["reference_id"]),
            "top1_score": missed["query_id"].map(top1["score"]),
            "query_path": missed["query_id"].map(query_path),
            "reference_path": missed["reference_id"].map(reference_path),
        })
        return out.sort_values("true_score", na_position="first", kind="stable").head(n).reset_index(drop=True)

    def false_positive_kinds(self, methods: Sequence[str]) -> pd.DataFrame:
        """The wrong matches each method accepts on test at its val-chosen threshold, counted by
        the content type of the query's image and of the matched reference (`photo` for the photo
        part, else the class): why a class gate can or cannot cut them, since it only separates
        pairs whose types differ."""
        split = self.test_split
        query_type = _content_types(split.queries, "query_id")
        reference_type = _content_types(split.references, "reference_id")
        thresholds = self.table.set_index("method")["threshold"]
        counts = []
        for method in methods:
            predictions = self._predictions(method)
            wrong = predictions[(predictions["score"] >= thresholds[method]) & ~predictions["correct"]]
            kinds = pd.DataFrame({"query_type": wrong["query_id"].map(query_type),
                                  "reference_type": wrong["reference_id"].map(reference_type)})
            table = kinds.value_counts().rename("false_positives").reset_index()
            counts.append(table.assign(method=method, same_type=table["query_type"] == table["reference_type"]))
        columns = ["method", "query_type", "reference_type", "same_type", "false_positives"]
        return pd.concat(counts, ignore_index=True)[columns] if counts else pd.DataFrame(columns=columns)

    def _predictions(self, method: str) -> pd.DataFrame:
        if method not in self.test_predictions:
            raise KeyError(f"no method {method!r}; evaluated: {sorted(self.test_predictions)}")
        return self.test_predictions[method]


def _content_types(frame: pd.DataFrame, id_column: str) -> pd.Series:
    """id → `photo` for the eval set's photo part, else the image's class."""
    photo = frame["part"].eq("photo") if "part" in frame else pd.Series(False, index=frame.index)
    return pd.Series(np.where(photo, "photo", frame["class"].astype(str)), index=frame[id_column].astype(str))


def image_pairs(frame: pd.DataFrame, caption_columns=("score", "transformation")) -> list[tuple[str, str, str]]:
    """(query_path, reference_path, caption) triples for mtl.plots.image_pairs."""
    pairs = []
    for row in frame.to_dict("records"):
        parts = [f"{c}={_short(row[c])}" for c in caption_columns if c in row and not _missing(row[c])]
        pairs.append((row["query_path"], row["reference_path"], " ".join(parts)))
    return pairs


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _short(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _plain(value):
    """numpy scalars → python numbers for JSON; inf/NaN → None."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _score_method(name: str, val: pd.DataFrame, test: pd.DataFrame, val_split: EvalSplit,
                  test_split: EvalSplit, target_precision: float) -> tuple[dict, pd.DataFrame, PrecisionRecallCurve]:
    """Test metrics, with the operating threshold chosen on val."""
    threshold = threshold_for_precision(val, val_split.n_ground_truth, target_precision)
    metrics = retrieval_metrics(test, test_split.queries, target_precision)
    held_out = held_out_metrics(test, test_split.queries, target_precision)
    operating = false_positives_at(test, threshold, test_split.n_ground_truth)
    row = {"method": name, "muap": metrics.muap, "recall_at_p90": metrics.recall_at_p90,
           "acc_at_1": metrics.acc_at_1, "muap_held_out": held_out.muap, "acc_at_1_held_out": held_out.acc_at_1,
           "fp_at_threshold": operating.false_positives, "tp_at_threshold": operating.true_positives,
           "threshold": threshold, **part_columns(test, test_split.queries, threshold, target_precision)}
    per = recall_by_transformation(test, test_split.queries, threshold).assign(method=name)
    return row, per, precision_recall_curve(test, test_split.n_ground_truth)


def query_parts(queries: pd.DataFrame) -> dict[str, pd.Series]:
    """Boolean masks of the eval set's parts: `photo` (the photo part) and `clipart` (the
    clip-art queries of the general part); an eval set without the `part` column has no
    photo part."""
    part = queries["part"] if "part" in queries else pd.Series("general", index=queries.index)
    return {"photo": part == "photo", "clipart": (part != "photo") & (queries["class"] == "clipart")}


def part_columns(test: pd.DataFrame, queries: pd.DataFrame, threshold: float,
                 target_precision: float) -> dict[str, float]:
    """μAP, R@P90 (photo and clip art), acc@1 and false positives at the val threshold (photo)
    of each part's queries in the whole gallery."""
    columns = {}
    for part, mask in query_parts(queries).items():
        scored = subset_metrics(test, queries, mask, target_precision)
        columns[f"muap_{part}"], columns[f"recall_at_p90_{part}"] = scored.muap, scored.recall_at_p90
        if part == "photo":
            ids = set(queries.loc[mask, "query_id"].astype(str))
            photo = test[test["query_id"].astype(str).isin(ids)]
            columns["acc_at_1_photo"] = scored.acc_at_1
            columns["fp_photo"] = false_positives_at(photo, threshold).false_positives if mask.any() else np.nan
    return columns


def evaluate_methods(eval_dir: str | Path, embeddings: Mapping[str, Mapping[str, str | Path]],
                     k: int = 10, target_precision: float = 0.9, decisions_from: Sequence[str] = (),
                     betas=DEFAULT_BETAS, normalize: bool = True, norm_ks=K_GRID,
                     norm_betas=BETA_GRID) -> MethodsEvaluation:
    """Search, score and tabulate every method, in the given order; see the module docstring.

    `embeddings` maps a method name to {"val": npz, "test": npz} (as returned by
    embed_methods); each npz holds the split's references and queries (roles).
    Each method in `decisions_from` adds its gate and fusion rows (from its class
    probabilities).  With `normalize`, every method adds its normalized rows, k and β
    chosen on val from the grids `norm_ks` x `norm_betas`.
    """
    missing = [m for m in decisions_from if m not in embeddings]
    if missing:
        raise ValueError(f"decisions_from {missing} have no embeddings; given: {sorted(embeddings)}")
    splits = {s: EvalSplit.load(eval_dir, s) for s in SPLITS}
    rows, per_transformation, curves, test_predictions = [], [], {}, {}
    fusion_grids, normalization_grids = [], []

    def add(name: str, runs: Mapping[str, pd.DataFrame], extra: dict) -> None:
        row, per, curve = _score_method(name, runs["val"], runs["test"], splits["val"], splits["test"],
                                        target_precision)
        rows.append({**row, **extra})
        per_transformation.append(per)
        curves[name] = curve
        test_predictions[name] = runs["test"]

    def add_decisions(name: str, runs: Mapping[str, _Run], extra: dict) -> None:
        agreed = {s: _class_agreement(runs[s]) for s in SPLITS}
        add(f"{name}_gate", {s: apply_gate(agreed[s]) for s in SPLITS}, extra)
        tuning = tune_fusion_beta(agreed["val"], splits["val"].n_ground_truth, betas)
        fusion_grids.append(tuning.grid.assign(method=name))
        add(f"{name}_fusion", {s: apply_fusion(agreed[s], tuning.beta) for s in SPLITS},
            {**extra, "beta": tuning.beta})

    for method, files in embeddings.items():
        missing = [s for s in SPLITS if s not in files]
        if missing:
            raise ValueError(f"method {method!r} lacks embeddings for split(s) {missing}")
        results = {s: load_npz(files[s]) for s in SPLITS}
        runs = {s: _search_split(results[s], splits[s], k) for s in SPLITS}
        test_emb = results["test"]
        extra = {"bytes_per_vector": test_emb.bytes_per_vector, "dim": test_emb.dim,
                 "images_per_second": test_emb.images_per_second,
                 "search_ms_per_query": runs["test"].search_ms_per_query,
                 "n_failed_images": len(test_emb.failed)}
        add(method, {s: runs[s].predictions for s in SPLITS}, extra)
        if method in decisions_from:
            add_decisions(method, runs, extra)
        if not normalize:
            continue
        chosen, grid = choose_normalization(results["val"], splits["val"], k, norm_ks, norm_betas)
        normalization_grids.append(grid.assign(method=method))
        if method in HASH_METHODS and chosen.beta == 0:
            continue  # val keeps the raw hash score: no normalized row
        normalized = {s: _normalized_split(results[s], splits[s], k, chosen) for s in SPLITS}
        norm_extra = {**extra, "search_ms_per_query": normalized["test"].search_ms_per_query,
                      "norm_k": chosen.k, "norm_beta": chosen.beta}
        add(f"{method}_norm", {s: normalized[s].predictions for s in SPLITS}, norm_extra)
        if method in decisions_from:
            add_decisions(f"{method}_norm", normalized, norm_extra)
    table = pd.DataFrame(rows)
    columns = ["method", "muap", "recall_at_p90", "acc_at_1", "muap_held_out", "acc_at_1_held_out",
               "fp_at_threshold", "tp_at_threshold", "threshold", "muap_photo", "recall_at_p90_photo",
               "acc_at_1_photo", "fp_photo", "muap_clipart", "recall_at_p90_clipart", "bytes_per_vector", "dim",
               "images_per_second", "search_ms_per_query", "n_failed_images", "beta", "norm_k", "norm_beta"]
    table = table.reindex(columns=[c for c in columns if c in table.columns])
    return MethodsEvaluation(table=table, per_transformation=pd.concat(per_transformation, ignore_index=True),
                             pr_curves=curves, test_predictions=test_predictions, test_split=splits["test"],
                             fusion_grid=_concat(fusion_grids), normalization_grid=_concat(normalization_grids))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_backgrounds(eval_dir: str | Path, embeddings: Mapping[str, Mapping[str, str | Path]],
                        backgrounds: Mapping[str, str | Path], k: int = 10, target_precision: float = 0.9,
                        norm_ks=K_GRID, norm_betas=BETA_GRID) -> pd.DataFrame:
    """The normalization's backgrounds side by side, for each method of `backgrounds`
    ({method: npz of training pictures' descriptors}): raw, the references as background,
    and the fixed set; each with its own k and β chosen on val.  One row per method and
    background: k, beta, val μAP, test μAP, R@P90 and acc@1."""
    splits = {s: EvalSplit.load(eval_dir, s) for s in SPLITS}
    rows = []
    for method, background_file in backgrounds.items():
        results = {s: load_npz(embeddings[method][s]) for s in SPLITS}
        fixed = load_npz(background_file).embeddings
        for name, background in (("raw", None), ("references", None), ("fixed", fixed)):
            if name == "raw":
                chosen = Normalization(1, 0.0)
            else:
                chosen, _ = choose_normalization(results["val"], splits["val"], k, norm_ks, norm_betas, background)
            scored = {}
            for s in SPLITS:
                predictions = _normalized_split(results[s], splits[s], k, chosen, background).predictions
                scored[s] = retrieval_metrics(predictions, splits[s].queries, target_precision)
            rows.append({"method": method, "background": name, "k": chosen.k if name != "raw" else None,
                         "beta": chosen.beta, "background_images": len(fixed) if name == "fixed" else None,
                         "val_muap": scored["val"].muap, "muap": scored["test"].muap,
                         "recall_at_p90": scored["test"].recall_at_p90, "acc_at_1": scored["test"].acc_at_1})
    return pd.DataFrame(rows)


def checkpoint_scores(checkpoint: str | Path, eval_dir: str | Path, split: str, cfg: EvalConfig,
                      image_size: int | None = None,
                      normalizations: Mapping[str, Normalization] | None = None) -> dict[str, dict[str, float]]:
    """μAP, R@P90 and acc@1 (all queries, the held-out ones, the photo part and the clip-art
    queries) of a checkpoint's MTL embedding and of its backbone's 1280-d output on one eval
    split, embedded at `image_size` (default: the evaluation's): how diagnostics and recipe
    choices are scored (on val, never on test).  Normalized too (`*_norm` keys, and the
    norm_k, norm_beta used): on val with k and β chosen there, on another split only with
    the `normalizations` ({kind: Normalization}) chosen on val."""
    eval_split = EvalSplit.load(eval_dir, split)
    many = embed_many(checkpoint, images_in_evalset(Path(eval_dir) / split), image_size or cfg.image_size,
                      cfg.batch_size, cfg.device)
    scores = {}
    for kind in ("mtl", "gap1280"):
        predictions = _search_split(many[kind], eval_split, cfg.top_k).predictions
        scored = [("", predictions)]
        normalization = (normalizations or {}).get(kind)
        if normalization is None and split == "val":
            normalization, _ = choose_normalization(many[kind], eval_split, cfg.top_k, cfg.norm_k_grid,
                                                    cfg.norm_beta_grid)
        scores[kind] = {}
        if normalization is not None:
            scored.append(("_norm", _normalized_split(many[kind], eval_split, cfg.top_k, normalization).predictions))
            scores[kind].update(norm_k=normalization.k, norm_beta=normalization.beta)
        for suffix, found in scored:
            metrics = retrieval_metrics(found, eval_split.queries, cfg.target_precision)
            held_out = held_out_metrics(found, eval_split.queries, cfg.target_precision)
            scores[kind].update({f"muap{suffix}": metrics.muap, f"recall_at_p90{suffix}": metrics.recall_at_p90,
                                 f"acc_at_1{suffix}": metrics.acc_at_1, f"muap_held_out{suffix}": held_out.muap,
                                 f"acc_at_1_held_out{suffix}": held_out.acc_at_1})
            for part, mask in query_parts(eval_split.queries).items():
                scores[kind][f"muap_{part}{suffix}"] = subset_metrics(found, eval_split.queries, mask).muap
    return scores
