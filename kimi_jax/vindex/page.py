"""``vindex.html``: one self-contained page (works from file:// offline) over ``summary.json``.

Chart.js 4 and chartjs-chart-matrix are vendored in ``kimi_jax/assets`` (MIT, licenses next to
them) and inlined here at build time; the data goes in as a JSON script element. Every number
is also in plain HTML tables, so the page says everything even with scripts disabled.
"""

from __future__ import annotations

import html
from typing import Any

from kimi_jax.explorer.page import LIBRARIES, inline_library, json_for_script


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _phase1_table(p1: dict[str, Any]) -> str:
    rows = []
    for L in p1["layers"]:
        v, r = L["var_at_64"], L["s0_over_s1"]
        rows.append([str(L["layer"]), L["kind"], str(L["n_matrices"]), "&times;".join(map(str, L["shape"])),
                     _num(v["median"]), f"{_num(v['q25'])} &ndash; {_num(v['q75'])}", _num(r["median"], 3),
                     html.escape(L["spectral_class"])])  # fmt: skip
    return _table(["layer", "kind", "matrices", "shape", "var@64 median", "IQR (Q25 &ndash; Q75)",
                   "s0/s1 median", "class"], rows)  # fmt: skip


def _phase2_table(p2: dict[str, Any]) -> str:
    rows = [[str(L["layer"]), "&times;".join(map(str, L["shape"])), _num(L["var_at_64"]), _num(L["s0_over_s1"], 3),
             _num(L["frobenius"], 3), html.escape(L["spectral_class"])] for L in p2["layers"]]  # fmt: skip
    return _table(["layer", "router shape", "var@64", "s0/s1", "Frobenius", "class"], rows)


def _phase3_table(p3: dict[str, Any]) -> str:
    rows = [[str(L["layer"]), str(L["positions"]), str(L["experts_used"]), _num(L["entropy"]),
             _num(L["normalised_entropy"]), _num(L["top_k_weight_share"]),
             ", ".join(map(str, L["top_k_experts"]))] for L in p3["layers"]]  # fmt: skip
    return _table(["layer", "positions", "experts used", "entropy (nats)", "normalised entropy",
                   f"top-{p3.get('top_k', 'k')} weight share", "most-used experts"], rows)  # fmt: skip


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#1b1b1b}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}.chart{position:relative;height:340px}.heat{position:relative;height:460px}
.note{color:#555;font-size:12px}code{background:#f4f4f4;padding:0 3px}
"""

_SCRIPT = r"""
(function(){
const D = JSON.parse(document.getElementById('vindex-data').textContent);
if (typeof Chart === 'undefined') return;
Chart.defaults.animation = false;
const lin = (t) => ({type:'linear', title:{display:true, text:t}});
const ints = (t) => ({...lin(t), ticks:{precision:0}});
const only = (vals) => (axis) => { axis.ticks = vals.map(v => ({value:v})); };
const p1 = D.phase1, p2 = D.phase2, p3 = D.phase3;
const el = (id) => document.getElementById(id);
if (p1 && el('var64')) {
  const L = p1.layers;
  const pt = (f) => L.filter(l => f(l) !== null).map(l => ({x:l.layer, y:f(l), kind:l.kind}));
  const ds = [
    {label:'Q75', data:pt(l => l.var_at_64.q75), borderWidth:0, pointRadius:0, fill:'+1',
     backgroundColor:'rgba(54,124,214,0.22)'},
    {label:'Q25', data:pt(l => l.var_at_64.q25), borderWidth:0, pointRadius:0, fill:false},
    {label:'median var@64 (experts; diamond: a dense layer)', data:pt(l => l.var_at_64.median), borderColor:'rgb(24,84,170)',
     backgroundColor:'rgb(24,84,170)', fill:false,
     pointStyle:(c) => (c.raw && c.raw.kind === 'dense') ? 'rectRot' : 'circle', pointRadius:(c) => (c.raw && c.raw.kind === 'dense') ? 5 : 3},
  ];
  // order -1: drawn over the experts' median, which it equals where both are 1.0 (64 values or fewer)
  if (p2) ds.push({label:'router var@64', data:p2.layers.filter(l => l.var_at_64 !== null)
     .map(l => ({x:l.layer, y:l.var_at_64})), borderColor:'rgb(214,110,40)', backgroundColor:'rgb(214,110,40)',
     borderDash:[5,4], pointStyle:'triangle', pointRadius:5, fill:false, order:-1});
  const xs = L.map(l => l.layer);
  ds.push({label:'dissolved below ' + D.method.dissolved_below, data:[{x:Math.min(...xs), y:D.method.dissolved_below},
     {x:Math.max(...xs), y:D.method.dissolved_below}], borderColor:'#999', borderDash:[2,3], pointRadius:0, fill:false});
  new Chart(el('var64'), {type:'line', data:{datasets:ds}, options:{maintainAspectRatio:false,
    scales:{x:ints('layer'), y:{...lin('var@64'), min:0, max:1}},
    plugins:{legend:{labels:{filter:(i) => i.text !== 'Q75' && i.text !== 'Q25'}},
             tooltip:{mode:'index', intersect:false}}}});
}
if (p3 && el('usage')) {
  const L = p3.layers, n = D.checkpoint.n_routed_experts;
  const cells = []; let vmax = 0;
  for (const l of L) { const tot = l.counts.reduce((a, b) => a + b, 0) || 1;
    l.counts.forEach((c, e) => { const v = c / tot; vmax = Math.max(vmax, v); cells.push({x:e, y:l.layer, v:v}); }); }
  const ys = L.map(l => l.layer);
  new Chart(el('usage'), {type:'matrix', data:{datasets:[{label:'selection share', data:cells,
      backgroundColor:(c) => { const v = c.raw ? c.raw.v : 0; return 'rgba(200,40,40,' + (vmax ? v / vmax : 0).toFixed(3) + ')'; },
      borderWidth:0,
      width:({chart}) => Math.max(1, (chart.chartArea || {width:0}).width / n - 0.2),
      height:({chart}) => Math.max(1, (chart.chartArea || {height:0}).height / Math.max(1, Math.max(...ys) - Math.min(...ys) + 1) - 0.2)}]},
    options:{maintainAspectRatio:false, plugins:{legend:{display:false}, tooltip:{callbacks:{
        title:() => '', label:(c) => 'layer ' + c.raw.y + ', expert ' + c.raw.x + ': ' + (100 * c.raw.v).toFixed(2) + '%'}}},
      scales:{x:{...lin('expert'), min:-0.5, max:n - 0.5, offset:false, grid:{display:false},
                 afterBuildTicks:only([...Array(n).keys()].filter(e => e % Math.max(1, Math.ceil(n / 24)) === 0))},
              y:{...lin('layer'), min:Math.min(...ys) - 0.5, max:Math.max(...ys) + 0.5, offset:false, reverse:true,
                 grid:{display:false}, afterBuildTicks:only(ys.filter(y => y % Math.max(1, Math.ceil(ys.length / 30)) === 0))}}}});
  new Chart(el('entropy'), {type:'line', data:{datasets:[
      {label:'normalised usage entropy', data:L.map(l => ({x:l.layer, y:l.normalised_entropy})),
       borderColor:'rgb(40,140,90)', backgroundColor:'rgb(40,140,90)', fill:false},
      {label:'weight share of the top-' + p3.top_k + ' experts', data:L.map(l => ({x:l.layer, y:l.top_k_weight_share})),
       borderColor:'rgb(150,60,170)', backgroundColor:'rgb(150,60,170)', fill:false}]},
    options:{maintainAspectRatio:false, scales:{x:ints('layer'), y:{...lin('fraction'), min:0, max:1}}}});
}
})();
"""


def build_html(summary: dict[str, Any]) -> str:
    """The whole page as one string: styles, vendored chart libraries, data and tables inline."""
    ck = summary["checkpoint"]
    p1, p2, p3 = summary.get("phase1"), summary.get("phase2"), summary.get("phase3")
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>vindex: {html.escape(ck['layout'])} {html.escape(ck['name'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>vindex of {html.escape(ck['name'])}</h1>",
        f"<p>{html.escape(ck['layout'])} checkpoint, {ck['num_hidden_layers']} layers, {ck['n_routed_experts']} routed "
        f"experts (top-{ck['num_experts_per_tok']}); tensor digest <code>{html.escape(ck['tensor_digest'][:16])}</code>.</p>",
        "<noscript><p class=\"note\">Scripts are off: the charts are not drawn, the tables below hold every number.</p></noscript>",
    ]  # fmt: skip
    method = summary["method"]
    if p1:
        model = p1["model"]
        parts += [
            "<h2>Phase 1: expert down_proj spectra</h2>",
            f"<p>Pooled over the routed experts analysed: median var@64 <b>{_num(model['var_at_64']['median'])}</b> "
            f"(IQR {_num(model['var_at_64']['q25'])} &ndash; {_num(model['var_at_64']['q75'])}, "
            f"{model['var_at_64']['n']} experts): <b>{html.escape(model['spectral_class'])}</b> "
            f"(dissolved when the median var@64 is below {method['dissolved_below']}).</p>",
            "<div class=\"chart\"><canvas id=\"var64\"></canvas></div>",
            f"<p class=\"note\">Band: Q25&ndash;Q75 of var@64 over the layer's experts; line: the median; "
            "dashed, with triangles, drawn on top: the router's var@64 (phase 2), which lies on the median where "
            "both are 1.0 (a matrix with 64 singular values or fewer). "
            f"Singular values: {html.escape(method['svd'])}; {html.escape(method['guarantee'])}.</p>",
            _phase1_table(p1),
        ]  # fmt: skip
    if p2:
        parts += ["<h2>Phase 2: router spectra</h2>", _phase2_table(p2)]
    if p3:
        parts += [
            "<h2>Phase 3: routing statistics</h2>",
            f"<p>{p3['sources']['prompts']} engine run(s) and {p3['sources']['bundles']} ledger(s); each token "
            "position counted once.</p>",
            "<div class=\"heat\"><canvas id=\"usage\"></canvas></div>",
            "<p class=\"note\">Share of the layer's expert selections that went to each expert.</p>",
            "<div class=\"chart\"><canvas id=\"entropy\"></canvas></div>",
            _phase3_table(p3),
        ]  # fmt: skip
    libs = "".join(f"<script>\n{inline_library(name)}\n</script>" for name in LIBRARIES)
    parts += [
        "<p class=\"note\">Charts: Chart.js 4 and chartjs-chart-matrix (MIT licensed), inlined.</p>",
        f"<script id=\"vindex-data\" type=\"application/json\">{json_for_script(summary)}</script>",
        libs,
        f"<script>{_SCRIPT}</script>",
        "</body></html>\n",
    ]
    return "\n".join(parts)
