"""report.html of `mtl dedup`: review the duplicates in a browser, offline.

One self-contained file: thumbnails are embedded (JPEG data URIs, each image once),
style and script are inline, and a Content-Security-Policy forbids every network
request.  Groups come highest score first; each pair shows both images side by side
with the score (on the run's scale, named in the header), predicted classes (MTL), the
pHash distance (combined decision), pixel sizes and file sizes, the keeper marked.
Matched pairs that join no group (an image matching a member but not its keeper) and
pairs listed but not kept (below the threshold with --min-score-report, or split by the
class gate) follow in their own sections.

In the page: the score filter (slider or number) hides pairs below it, live;
j / k or the arrow keys go to the next / previous group, + / - move the filter by 0.01,
/ focuses it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.data.imageio import fit_within, load_image
from mtl.eval.baselines import hamming_from_score

THUMBNAIL_SIDE = 160
MAX_PAIRS_PER_GROUP = 30      # a 20-image group has 190 pairs; pairs.csv has them all
MAX_UNKEPT_PAIRS = 500


def thumbnail_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG of the image as a data URI ('' if it cannot be read any more)."""
    loaded = load_image(path, max_side=side)
    if loaded.image is None:
        return ""
    buffer = io.BytesIO()
    fit_within(loaded.image, side).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _file_caption(result, id_: str, role: str) -> str:
    facts = result.facts.loc[id_]
    parts = [f"{int(facts['width'])}×{int(facts['height'])} px", f"{facts['bytes'] / 1024:,.0f} KB"]
    if "class" in facts and isinstance(facts["class"], str):
        parts.append(html.escape(facts["class"]))
    badge = f'<b class="{role}">{role}</b>' if role else ""
    return f'<span class="path">{html.escape(id_)}</span><br>{" · ".join(parts)} {badge}'


def _score_text(result, score: float, same_class, hamming=None, why: str = "") -> str:
    text = f"{score:.3f}"
    if result.method.descriptor in ("phash", "dhash"):
        text += f"<br><small>{int(hamming_from_score(score))} bits apart</small>"
    elif not pd.isna(hamming):
        text += f"<br><small>pHash {int(hamming)} bits apart</small>"
    if why == "hash":
        text += "<br><small>kept by its pHash</small>"
    if not pd.isna(same_class):
        text += "<br><small>same class</small>" if same_class else "<br><small>classes differ</small>"
    return text


def _pair_html(result, row, thumbs: dict[str, int], keepers: set[str]) -> str:
    figures = []
    first, second = (row.b, row.a) if row.b in keepers else (row.a, row.b)  # the keeper on the left
    for id_ in (first, second):
        role = "keep" if id_ in keepers else ("duplicate" if row.kept else "")
        figures.append(f'<figure><img data-thumb="{thumbs[id_]}" alt="{html.escape(id_)}">'
                       f'<figcaption>{_file_caption(result, id_, role)}</figcaption></figure>')
    kind = "pair kept" if row.kept else "pair"
    score = _score_text(result, row.score, row.same_class, getattr(row, "hamming", None), getattr(row, "why", ""))
    return (f'<div class="{kind}" data-score="{row.score:.6f}">{figures[0]}'
            f'<div class="score">{score}</div>{figures[1]}</div>')


def _section(title: str, pairs_html: list[str], hidden_count: int, score: float, css: str) -> str:
    more = f'<p class="more">{hidden_count} more pairs in pairs.csv</p>' if hidden_count else ""
    return (f'<section class="{css}" data-score="{score:.6f}" tabindex="-1"><h2>{title}</h2>'
            f'{"".join(pairs_html)}{more}</section>')


def render_report(result) -> str:
    """The whole page as a string (see the module docstring)."""
    pairs = result.pairs
    listed = list(dict.fromkeys(list(pairs["a"]) + list(pairs["b"])))
    thumbs = {id_: k for k, id_ in enumerate(listed)}
    uris = [thumbnail_uri(Path(result.folder) / id_) for id_ in listed]
    keepers = {g.keeper for g in result.groups}
    group_of = {m: k for k, g in enumerate(result.groups) for m in g.members}
    kept = pairs[pairs["kept"]]
    group_a, group_b = kept["a"].map(group_of), kept["b"].map(group_of)
    inside = group_a.notna() & (group_a == group_b)
    rows_by_group = {int(k): rows for k, rows in kept[inside].groupby(group_a[inside], sort=False)}
    sections = []
    for k, group in enumerate(result.groups):
        rows = rows_by_group[k]
        shown = [_pair_html(result, r, thumbs, keepers) for r in rows.head(MAX_PAIRS_PER_GROUP).itertuples()]
        title = (f"Group {k + 1} · {len(group.members)} images · best score {group.max_score:.3f} · "
                 f"keep {html.escape(group.keeper)}")
        sections.append(_section(title, shown, len(rows) - len(shown), group.max_score, "group"))
    across = kept[~inside]
    if len(across):
        shown = [_pair_html(result, r, thumbs, keepers) for r in across.head(MAX_UNKEPT_PAIRS).itertuples()]
        sections.append(_section("Matched, not grouped: each image matches a member of another group, not its "
                                 "keeper (groups do not chain)", shown, len(across) - len(shown),
                                 float(across["score"].max()), "unkept"))
    unkept = pairs[~pairs["kept"]]
    if len(unkept):
        shown = [_pair_html(result, r, thumbs, keepers) for r in unkept.head(MAX_UNKEPT_PAIRS).itertuples()]
        sections.append(_section("Listed, not kept: below the threshold, or predicted classes differ (class gate)",
                                 shown, len(unkept) - len(shown), float(unkept["score"].max()), "unkept"))
    return _page(result, sections, uris)


def _page(result, sections: list[str], uris: list[str]) -> str:
    m, e = result.method, result.embedded
    lowest = float(result.pairs["score"].min()) if len(result.pairs) else m.threshold
    start = max(-1.0, np.floor(min(lowest, m.threshold) * 100) / 100)
    unreadable = f" · {len(e.failed)} unreadable, skipped" if e.failed else ""
    summary = (f"{html.escape(str(result.folder))}: {e.n_files} images{unreadable} · method {html.escape(m.describe())} · "
               f"{len(result.groups)} groups, {int(result.pairs['kept'].sum())} duplicate pairs")
    body = "\n".join(sections) or '<p class="empty">No duplicates found.</p>'
    return PAGE.format(title=html.escape(f"Duplicates in {Path(result.folder).name}/"), summary=summary,
                       start=f"{start:.2f}", threshold=f"{m.threshold:.4f}", body=body,
                       thumbs=json.dumps(uris), style=STYLE, script=SCRIPT)


def write_report(result, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_report(result), encoding="utf-8")
    return path


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title><style>{style}</style></head>
<body>
<header>
  <h1>{title}</h1>
  <p>{summary}</p>
  <p class="controls"><label for="filter">show pairs scoring at least</label>
    <input type="range" id="filter" min="{start}" max="1" step="0.001" value="{start}">
    <input type="number" id="filter-value" min="{start}" max="1" step="0.001" value="{start}">
    <span id="shown"></span>
    <span class="keys">threshold {threshold} · keys: j/k or ↓/↑ next/previous group, +/− filter, / edit filter</span></p>
</header>
<main>
{body}
</main>
<script>const THUMBS = {thumbs};</script>
<script>{script}</script>
</body></html>
"""

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: 8px 16px; border-bottom: 1px solid #ccc; z-index: 1; }
h1 { font-size: 18px; margin: 4px 0; } h2 { font-size: 15px; margin: 0 0 8px; }
.controls input[type=range] { width: 320px; vertical-align: middle; }
.controls input[type=number] { width: 80px; } .keys { color: #666; margin-left: 12px; }
main { padding: 8px 16px; }
section { background: #fff; border: 2px solid transparent; border-radius: 6px; padding: 10px; margin: 10px 0;
          scroll-margin-top: 140px; }
section.current { border-color: #2a6fdb; } section.unkept { background: #fafafa; }
.pair { display: flex; align-items: center; gap: 12px; padding: 6px 0; border-top: 1px solid #eee; }
figure { margin: 0; width: 260px; } figure img { max-width: 160px; max-height: 160px; display: block; }
figcaption { font-size: 12px; color: #444; word-break: break-all; } .path { font-weight: 600; }
.score { width: 110px; text-align: center; font-size: 18px; font-variant-numeric: tabular-nums; }
b.keep { color: #fff; background: #2e8b57; padding: 0 4px; border-radius: 3px; }
b.duplicate { color: #fff; background: #c0392b; padding: 0 4px; border-radius: 3px; }
.hidden { display: none; } .more { color: #666; }
"""

SCRIPT = """
const slider = document.getElementById('filter'), number = document.getElementById('filter-value');
document.querySelectorAll('img[data-thumb]').forEach(img => { img.src = THUMBS[+img.dataset.thumb]; });
function applyFilter(value, typing = false) {
  const min = Math.min(1, Math.max(+slider.min, +value || 0));
  slider.value = min;
  if (!typing) number.value = min.toFixed(3);  // never rewrite the number while it is being typed
  let pairs = 0, groups = 0;
  document.querySelectorAll('section').forEach(section => {
    let visible = 0;
    section.querySelectorAll('.pair').forEach(pair => {
      const show = +pair.dataset.score >= min - 1e-9;
      pair.classList.toggle('hidden', !show);
      visible += show;
    });
    section.classList.toggle('hidden', visible === 0);
    pairs += visible;
    if (visible && section.classList.contains('group')) groups += 1;
  });
  document.getElementById('shown').textContent = groups + ' groups, ' + pairs + ' pairs shown';
}
slider.addEventListener('input', () => applyFilter(slider.value));
number.addEventListener('input', () => applyFilter(number.value, true));
number.addEventListener('change', () => { if (number.value !== '') applyFilter(number.value); });
function go(step) {
  const sections = [...document.querySelectorAll('section:not(.hidden)')];
  if (!sections.length) return;
  const now = sections.indexOf(document.querySelector('section.current'));
  const next = sections[Math.min(sections.length - 1, Math.max(0, now + step))];
  sections.forEach(s => s.classList.remove('current'));
  next.classList.add('current');
  next.focus({preventScroll: true});
  next.scrollIntoView({block: 'start'});
}
document.addEventListener('keydown', event => {
  if (event.target.tagName === 'INPUT') { if (event.key === 'Escape') event.target.blur(); return; }
  const keys = {j: () => go(1), ArrowDown: () => go(1), k: () => go(-1), ArrowUp: () => go(-1),
                '+': () => applyFilter(+slider.value + 0.01), '-': () => applyFilter(+slider.value - 0.01),
                '/': () => number.focus()};
  if (keys[event.key]) { event.preventDefault(); keys[event.key](); }
});
applyFilter(slider.value);
"""
