"""The module tables of `locate` (own and accumulated error per module, in execution order)
as Markdown and HTML, with a plot of both along depth and the culprit marked."""
from __future__ import annotations

import html
from typing import Any, Dict, List, Sequence

from .plots import BOUND_COLOURS, line_chart_svg


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _title(loc: Dict[str, Any]) -> str:
    where = "" if loc.get("step") is None else f", {loc.get('sampler')} step {loc['step']}"
    return f"Modules of stage `{loc['stage']}`{where}"


def culprit_text(loc: Dict[str, Any]) -> str:
    m = loc.get("first_divergent_module")
    if not m and loc.get("divergence"):
        return loc["divergence"]["text"]
    if not m:
        return (loc.get("note") or "no module over its bound") + \
            f" ({len(loc.get('modules', []))} modules compared)"
    if m.get("error"):
        return (f"first divergent module: `{m['module']}` (`{m['reference_module']}`) raised "
                f"{m['error']}")
    return (f"first divergent module: `{m['module']}` (`{m['reference_module']}`), "
            f"{m['metric']} {m['value']:.3g} > bound {m['bound']:.3g}")


def unpaired_text(loc: Dict[str, Any]) -> str:
    """What pairing left alone, in one line."""
    u = loc.get("unpaired", {})
    port, ref = u.get("port_modules", []), u.get("reference_modules", [])
    text = (f"{len(loc['modules'])} port modules paired; {len(ref)} captured reference "
            f"modules computed by no port module")
    if port:
        text += (f", {len(port)} port modules whose weights have no sgm counterpart (first: "
                 f"'{port[0]}'; map names with --module-names FILE or the port's sgm_name())")
    if u.get("not_called"):
        text += f", {len(u['not_called'])} paired but never called"
    return text


def markdown_lines(localisation: Sequence[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    for loc in localisation:
        lines += ["", f"## {_title(loc)}", "", "- " + culprit_text(loc),
                  *([f"- unpaired: {unpaired_text(loc)} (listed in report.json)"]
                    if any(loc.get("unpaired", {}).values()) else []),
                  "- own: the port module on the reference's recorded inputs; accumulated: "
                  "the port's stage run freely; '-' where the port does not call the module "
                  "on its own (a layout entry point) or does not run it", ""]
        lines.append("| # | module | reference module | kind | own rel_l2 | accumulated rel_l2 "
                     "| bound | over |")
        lines.append("|---:|---|---|---|---:|---:|---:|---|")
        for i, r in enumerate(loc.get("modules", [])):
            mark = "**OVER**" if r["over"] else ""
            lines.append(f"| {i} | `{r['module']}` | `{r['reference_module']}` | {r['kind']} | "
                         f"{_fmt(r['own_rel_l2'])} | {_fmt(r['accumulated_rel_l2'])} | "
                         f"{r['bound']:.3g} | {mark}{' ' + r['error'] if r.get('error') else ''} |")
    return lines


def html_sections(localisation: Sequence[Dict[str, Any]]) -> List[str]:
    out: List[str] = []
    for loc in localisation:
        rows = loc.get("modules", [])
        nan = float("nan")
        series = {"own": [nan if r["own_rel_l2"] is None else r["own_rel_l2"] for r in rows],
                  "accumulated": [nan if r["accumulated_rel_l2"] is None
                                  else r["accumulated_rel_l2"] for r in rows]}
        culprit = next((i for i, r in enumerate(rows) if r["over"]), None)
        vlines = {} if culprit is None else {f"culprit #{culprit}": culprit}
        chart = line_chart_svg(series, title=_title(loc).replace("`", ""),
                               x_label="module (execution order)", y_label="rel L2",
                               hlines={"fail (largest module bound)":
                                       max((r["bound"] for r in rows), default=nan)},
                               vlines=vlines, width=900)
        out.append(f'<section id="modules-{html.escape(loc["stage"])}">'
                   f'<h2>{html.escape(_title(loc).replace("`", ""))}</h2>')
        out.append(f"<p>{html.escape(culprit_text(loc).replace('`', ''))}</p>")
        out.append(f'<div class="charts">{chart}</div>')
        out.append('<details open><summary>module table</summary><table class="tensors">'
                   "<tr><th>#</th><th>module</th><th>reference module</th><th>kind</th>"
                   "<th>own rel_l2</th><th>accumulated rel_l2</th><th>bound</th></tr>")
        for i, r in enumerate(rows):
            style = f' style="color:{BOUND_COLOURS["fail"]};font-weight:bold"' if r["over"] else ""
            out.append(f"<tr{style}><td>{i}</td><td><code>{html.escape(r['module'])}</code></td>"
                       f"<td><code>{html.escape(r['reference_module'])}</code></td>"
                       f"<td>{html.escape(r['kind'])}</td><td>{_fmt(r['own_rel_l2'])}</td>"
                       f"<td>{_fmt(r['accumulated_rel_l2'])}</td><td>{r['bound']:.3g}</td></tr>")
        out.append("</table></details></section>")
    return out
