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


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts → a Markdown table; columns are (key, header)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


RETRIEVAL_COLUMNS = [
    ("method", "method"), ("muap", "μAP"), ("recall_at_p90", "R@P90"), ("acc_at_1", "acc@1"),
    ("muap_held_out", "μAP held-out"), ("acc_at_1_held_out", "acc@1 held-out"),
    ("fp_at_threshold", "FP @ val thr."), ("bytes_per_vector", "bytes/vector"),
    ("images_per_second", "embed img/s"), ("search_ms_per_query", "search ms/query"),
]
