"""The README's measured tables are Markdown made from numbers: one number format and one
table layout for mtl.report and mtl.scale_report."""

from __future__ import annotations

import math



def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


# Columns that count things: a pandas row of floats brings them as 60.0, shown as 60.
COUNT_COLUMNS = frozenset({"fp_at_threshold", "fp_photo"})


def cell(key: str, value) -> str:
    """One table cell: `fmt`, with counts as whole numbers."""
    if key in COUNT_COLUMNS and isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    return fmt(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts → a Markdown table; columns are (key, header)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


RETRIEVAL_COLUMNS = [
    ("method", "method"), ("muap", "μAP"), ("recall_at_p90", "R@P90"), ("acc_at_1", "acc@1"),
    ("muap_held_out", "μAP held-out"), ("acc_at_1_held_out", "acc@1 held-out"),
    ("muap_photo", "μAP photos"), ("recall_at_p90_photo", "R@P90 photos"), ("muap_clipart", "μAP clip art"),
    ("recall_at_p90_clipart", "R@P90 clip art"),
    ("fp_at_threshold", "FP @ val thr."), ("fp_photo", "FP photos"), ("bytes_per_vector", "bytes/vector"),
    ("images_per_second", "embed img/s"), ("search_ms_per_query", "search ms/query"),
]
# The README's headline: what a reader compares first (the rest: docs/study.md).
HEADLINE_COLUMNS = [
    ("method", "method"), ("scale", "scores"), ("muap", "μAP"), ("recall_at_p90", "R@P90"), ("acc_at_1", "acc@1"),
    ("muap_held_out", "μAP held-out edits"), ("muap_photo", "μAP photos"), ("recall_at_p90_photo", "R@P90 photos"),
    ("muap_clipart", "μAP clip art"), ("fp_at_threshold", "FP @ val thr."),
]


def split_normalized(method: str) -> tuple[str, str]:
    """('best_finetune', 'normalized') for 'best_finetune_norm', (name, 'raw') otherwise;
    decision rows keep their suffix ('best_finetune_gate', 'normalized')."""
    if method.endswith("_norm"):
        return method[:-len("_norm")], "normalized"
    for suffix in ("_gate", "_fusion"):
        if method.endswith(f"_norm{suffix}"):
            return method[:-len(f"_norm{suffix}")] + suffix, "normalized"
    return method, "raw"


def scientific(value) -> str:
    """4e-06 -> 4e-6, 2e-05 -> 2e-5: learning rates as a reader writes them."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value == 0:
        return fmt(value)
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


# Stage order of dvc.yaml (a stage's runs in their foreach order), and where each stage's
# own work time is in results/metrics.json.
PIPELINE_ORDER = ["corpus", "evalset", "features", "train_frozen@paper", "train_frozen@best", "train_frozen@paper_mem0",
                  "train_frozen@best_mem0", "train_frozen", "train_finetune@paper", "train_finetune@best",
                  "train_finetune", "embeddings", "evaluate", "diagnose", "report"]


def stage_rank(stage: str) -> tuple[int, str]:
    for rank, name in enumerate(PIPELINE_ORDER):
        if stage == name or (name in ("train_frozen", "train_finetune", "diagnose") and stage.startswith(name + "@")):
            return rank, stage
    return len(PIPELINE_ORDER), stage
