"""HTML, CSS and inline SVG of the site: no script or style from anywhere but the page itself
and `style.css` next to it, so the pages work offline from disk."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from gsae.browser.examples import Strip

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;user-select:none}
th[title]{text-decoration:underline dotted}
th[data-dir=desc]::after{content:" \\25BC"}th[data-dir=asc]::after{content:" \\25B2"}
td.l,th.l{text-align:left}tr.dead{color:#999}.badge{background:#c33;color:#fff;border-radius:3px;
padding:0 4px;font-size:11px}.note{color:#555;font-size:12px;max-width:900px}
.strip{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;margin:3px 0;padding:2px 4px;
border-left:3px solid #ddd}.tok{border-radius:2px;padding:1px 0}.tok.off{color:#aaa}
.tok.centre{outline:1px solid #333}.act{color:#555;font-size:11px;margin-right:6px}
.cols{display:flex;gap:2em;flex-wrap:wrap}.tokens td{font-family:ui-monospace,monospace}
svg text{font-size:10px;fill:#444}.bar{fill:#4a7fb5}.banner{background:#fff3c4;padding:6px 10px;
border-left:4px solid #d9a400}.controls{margin:8px 0}.controls input{width:22em}
"""

TABLE_SCRIPT = """
const table=document.getElementById('latents'),body=table.tBodies[0],PER_PAGE=ROWS_PER_PAGE;
const box=document.getElementById('filter'),info=document.getElementById('pageinfo');
let page=1;
function sortBy(th,dir){const col=th.cellIndex;
dir=dir||(th.dataset.dir==='desc'?'asc':'desc');
for(const h of table.tHead.rows[0].cells)delete h.dataset.dir;th.dataset.dir=dir;
const key=r=>{const c=r.cells[col];return c.dataset.v===undefined?c.textContent:+c.dataset.v};
const rows=[...body.rows];const sign=dir==='asc'?1:-1;
rows.sort((a,b)=>{const x=key(a),y=key(b);return x<y?-sign:x>y?sign:0});body.append(...rows);}
function matches(r,q){if(!q)return true;
if(/^\\d+(\\s*,\\s*\\d+)*$/.test(q))return q.split(',').map(s=>+s).includes(+r.dataset.latent);
return r.dataset.tokens.toLowerCase().split('\\n').some(t=>t.includes(q.toLowerCase()));}
function show(){const q=box.value.trim(),kept=[...body.rows].filter(r=>matches(r,q));
const pages=Math.max(1,Math.ceil(kept.length/PER_PAGE));page=Math.min(Math.max(1,page),pages);
const first=(page-1)*PER_PAGE,shown=new Set(kept.slice(first,first+PER_PAGE));
for(const r of body.rows)r.hidden=!shown.has(r);
info.textContent=kept.length+' latents match; page '+page+' of '+pages;
const th=table.querySelector('th[data-dir]'),state=new URLSearchParams();
if(th)state.set('sort',th.dataset.key+','+th.dataset.dir);if(q)state.set('q',q);
if(page>1)state.set('page',page);history.replaceState(null,'','#'+state.toString());}
table.querySelectorAll('th[data-key]').forEach(th=>th.addEventListener('click',()=>{sortBy(th);page=1;show();}));
box.addEventListener('input',()=>{page=1;show();});
document.getElementById('prev').addEventListener('click',()=>{page--;show();});
document.getElementById('next').addEventListener('click',()=>{page++;show();});
const wanted=new URLSearchParams(location.hash.slice(1));
const [key,dir]=(wanted.get('sort')||'').split(',');
const th=key&&table.querySelector('th[data-key="'+key+'"]');if(th)sortBy(th,dir);
box.value=wanted.get('q')||'';page=+(wanted.get('page')||1);show();
"""


def table_script(rows_per_page: int) -> str:
    """The index table's script: sort by a header, filter, page; the state lives in the URL's
    fragment (#sort=KEY,desc&q=TEXT&page=N) so a view can be linked."""
    return TABLE_SCRIPT.replace("ROWS_PER_PAGE", str(int(rows_per_page)))


def page(title: str, body: str, css: str = "style.css") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="{css}"></head>'
            f"<body>\n{body}\n</body></html>\n")


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def sort_value(value: float | None) -> str:
    """The `data-v` attribute: missing numbers sort below every number."""
    if value is None or math.isnan(value):
        return "-Infinity"
    return repr(float(value))


def histogram_svg(counts: Sequence[int], edges: Sequence[float], xlabel: str,
                  width: int = 420, height: int = 150, extra: str = "") -> str:
    """Bars of `counts` over the bins `edges`, with the axis ends labelled."""
    top = max(max(counts, default=0), 1)
    left, bottom, plot_w, plot_h = 34, 30, width - 44, height - 42
    bar_w = plot_w / max(1, len(counts))
    bars = "".join(
        f'<rect class="bar" x="{left + i * bar_w:.1f}" y="{10 + plot_h * (1 - c / top):.1f}" '
        f'width="{max(bar_w - 1, 0.5):.1f}" height="{plot_h * c / top:.1f}">'
        f"<title>{fmt(edges[i])} to {fmt(edges[i + 1])}: {c}</title></rect>"
        for i, c in enumerate(counts))
    step = max(1, math.ceil(len(counts) / 6))
    ticks = "".join(
        f'<text x="{left + i * bar_w:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
        f"{fmt(edges[i])}</text>" for i in range(0, len(edges), step))
    axis = (f'<line x1="{left}" y1="{10 + plot_h}" x2="{left + plot_w}" y2="{10 + plot_h}" '
            f'stroke="#888"/>{ticks}'
            f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">'
            f"{escape(xlabel)}</text>"
            f'<text x="{left - 4}" y="16" text-anchor="end">{top}</text>'
            f'<text x="{left - 4}" y="{10 + plot_h}" text-anchor="end">0</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" role="img">'
            f"{bars}{axis}{extra}</svg>")


def strip_html(s: Strip, top: float) -> str:
    """One context window: tokens coloured by activation, the exact value and the first-order
    loss effect in each token's hover text."""
    cells = []
    for offset, (text, act, loss) in enumerate(zip(s.tokens, s.activations, s.loss_effects)):
        shown = escape(text.replace("\n", "\u23ce"))
        centre = " centre" if s.start + offset == s.position else ""
        if act is None:
            cells.append(f'<span class="tok off{centre}" title="not encoded">{shown}</span>')
            continue
        alpha = 0.0 if top <= 0 else min(1.0, act / top)
        cells.append(
            f'<span class="tok{centre}" style="background:rgba(235,110,20,{alpha:.2f})" '
            f'title="activation {act:.4g}; loss effect value*(d.g) {loss:.3g}">{shown}</span>')
    return (f'<div class="strip" data-context="{s.context}" data-position="{s.position}">'
            f'<span class="act">{s.activation:.3g}</span>{"".join(cells)}</div>')


def token_table(title: str, tokens: Sequence[str], values: Sequence[float]) -> str:
    rows = "".join(f'<tr><td class="l">{escape(repr(t))}</td><td>{v:+.3g}</td></tr>'
                   for t, v in zip(tokens, values))
    return f'<div><h3>{escape(title)}</h3><table class="tokens">{rows}</table></div>'


def key_values(items: dict[str, Any]) -> str:
    rows = "".join(f'<tr><th class="l">{escape(k)}</th><td class="l">{escape(str(v))}</td></tr>'
                   for k, v in items.items())
    return f"<table>{rows}</table>"
