"""`index.html`: one self-contained file (inline CSS, inline SVG plots, images as base64 data
URIs, no scripts), so it can be attached to a CI run or mailed and still open offline."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Dict, List, Optional

from parity.metrics import METRIC_DIRECTIONS
from parity.reports.markdown import cell, first_failure_text, meta_value, stage_columns
from parity.reports.modules import html_sections as module_html
from parity.reports.plots import line_chart_svg
from parity.results import ParityReport, StageResult

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222;
       max-width: 1400px; }
h1.headline { font-size: 20px; padding: 12px 16px; border-radius: 6px; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
.pass { background: #e3f4e4; color: #1b5e20; }
.warn { background: #fff3d6; color: #8a5300; }
.fail { background: #fde2e1; color: #b71c1c; }
.waived { background: #ece6f6; color: #4a2c82; }
.skip { background: #eeeeee; color: #555; }
.error { background: #f3d4f7; color: #6a1b9a; }
pre.traceback { font-size: 12px; background: #fafafa; padding: 8px; overflow-x: auto; }
.badge { padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: bold; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; }
figure img { width: 256px; max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 12px; color: #555; text-align: center; }
.meta td:first-child { font-weight: bold; }
section { border-top: 1px solid #ddd; padding-top: 8px; margin-top: 16px; }
.charts svg { margin: 4px 12px 4px 0; border: 1px solid #eee; }
"""

ROLE_CAPTIONS = {"ref": "reference (diffusers)", "port": "port (MindSpore)",
                 "diff": "|port - ref|, stretched to the largest difference"}


def esc(x) -> str:
    """Escape text content (quotes stay literal, so the headline reads as in report.md)."""
    return html.escape(str(x), quote=False)


def attr(x) -> str:
    return html.escape(str(x), quote=True)


def _badge(verdict) -> str:
    return f'<span class="badge {verdict.value}">{verdict.value.upper()}</span>'


def _data_uri(path: Path) -> Optional[str]:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _split_series(name: str):
    """'latents.rel_l2' -> ('latents', 'rel_l2'); a name without a dot is its own metric."""
    head, _, metric = name.rpartition(".")
    return (head, metric) if head else (name, name)


def _bound_lines(stage: StageResult, metric: str) -> Dict[str, float]:
    key = metric if METRIC_DIRECTIONS.get(metric, "max") == "max" else f"{metric}_min"
    lim = stage.limits.get(key)
    if not lim:
        return {}
    if lim["warn"] == lim["fail"]:
        return {f"fail {lim['fail']:g}": lim["fail"]}
    return {f"warn {lim['warn']:g}": lim["warn"], f"fail {lim['fail']:g}": lim["fail"]}


def _charts(stage: StageResult) -> List[str]:
    """One chart per metric of the stage's per-step series (log y for error metrics)."""
    by_metric: Dict[str, Dict[str, list]] = {}
    for name, values in stage.per_step.items():
        tensor, metric = _split_series(name)
        by_metric.setdefault(metric, {})[tensor] = values
    return [line_chart_svg(series, title=f"{stage.name}: {metric} per step", y_label=metric,
                           log_y=METRIC_DIRECTIONS.get(metric, "max") == "max",
                           hlines=_bound_lines(stage, metric))
            for metric, series in by_metric.items()]


def _growth_chart(report: ParityReport) -> Optional[str]:
    """rel_l2 per step of every stepped stage on one chart: teacher-forced (per-step) against
    free-running (accumulated) error."""
    series = {f"{s.name}: {_split_series(k)[0]}": v for s in report.ordered_stages()
              for k, v in s.per_step.items() if _split_series(k)[1] == "rel_l2"}
    if not series:
        return None
    return line_chart_svg(series, title="Error growth: rel_l2 per step, all stages",
                          y_label="rel_l2", log_y=True, width=900, height=360)


def _waiver_section(report: ParityReport) -> List[str]:
    w = report.waivers
    if w is None:
        return []
    out = [f"<h2>Waivers <small><code>{esc(w['file'])}</code></small></h2>"]
    if w["applied"]:
        out.append('<table class="summary"><tr><th>stage</th><th>tensor</th><th>step</th>'
                   "<th>waiver</th><th>owner</th><th>expires</th><th>reason</th></tr>")
        for a in w["applied"]:
            out.append(f'<tr class="waived"><td>{esc(a["stage"])}</td><td>{esc(a["tensor"])}'
                       f'</td><td>{"" if a["step"] is None else a["step"]}</td>'
                       f'<td>{esc(a["waiver"])}</td><td>{esc(a["owner"])}</td>'
                       f'<td>{esc(a["expires"])}</td><td>{esc(a["reason"])}</td></tr>')
        out.append("</table>")
    else:
        out.append("<p>nothing waived</p>")
    out += [f'<p class="fail">problem: {esc(p)}</p>' for p in w["problems"]]
    return out


def render_html(report: ParityReport, base_dir: Path) -> str:
    """HTML text of `report`; stage image paths are resolved against `base_dir`."""
    base_dir = Path(base_dir)
    v = report.verdict
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>SDXL parity: {esc(v.value.upper())}</title>",
           f"<style>{CSS}</style></head><body>",
           f'<h1 class="headline {v.value}">{esc(report.headline())}</h1>']

    out.append('<h2>Summary</h2><table class="summary"><tr><th>stage</th><th>verdict</th>'
               '<th>worst metric</th><th>first failure</th></tr>')
    for s in report.ordered_stages():
        out.append(f'<tr><td><a href="#stage-{attr(s.name)}">{esc(s.name)}</a></td>'
                   f'<td class="{s.verdict.value}">{s.verdict.value.upper()}</td>'
                   f"<td>{esc(s.worst_metric())}</td><td>{esc(first_failure_text(s))}</td></tr>")
    out.append("</table>")

    out += _waiver_section(report)

    growth = _growth_chart(report)
    if growth:
        out.append(f'<div class="charts">{growth}</div>')

    out.append('<h2>Run</h2><table class="meta">')
    out.append(f"<tr><td>created</td><td>{esc(report.created)}</td></tr>")
    for key in sorted(report.meta):
        out.append(f"<tr><td>{esc(key)}</td><td><code>{esc(meta_value(report.meta[key], 2000))}"
                   f"</code></td></tr>")
    out.append("</table>")

    for s in report.ordered_stages():
        out.append(f'<section id="stage-{attr(s.name)}"><h2>Stage {esc(s.name)} '
                   f"{_badge(s.verdict)}</h2>")
        if s.error:
            out.append(f'<p class="error">The port raised <code>{esc(s.error)}</code></p>')
            if s.traceback:
                out.append("<details><summary>traceback</summary>"
                           f'<pre class="traceback">{esc(s.traceback)}</pre></details>')
        if s.notes:
            out.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in s.notes) + "</ul>")
        if s.limits:
            out.append("<p>Policy bounds: " + ", ".join(
                f"<code>{esc(k)}</code> warn {lim['warn']:g} / fail {lim['fail']:g}"
                for k, lim in s.limits.items()) + "</p>")
        charts = _charts(s)
        if charts:
            out.append('<div class="charts">' + "".join(charts) + "</div>")
        if s.images:
            out.append('<div class="figs">')
            for role, rel in s.images.items():
                uri = _data_uri(base_dir / rel)
                caption = esc(ROLE_CAPTIONS.get(role, role))
                body = (f'<img src="{uri}" alt="{attr(role)}">' if uri
                        else f"<p>missing image: {esc(rel)}</p>")
                out.append(f"<figure>{body}<figcaption>{caption}</figcaption></figure>")
            out.append("</div>")
        if s.tensors:
            cols = stage_columns(s.tensors)
            out.append("<details" + ("" if s.verdict.value == "pass" else " open") +
                       f"><summary>{len(s.tensors)} comparisons</summary><table><tr>"
                       "<th>tensor</th><th>step</th><th>verdict</th>" +
                       "".join(f"<th>{esc(c)}</th>" for c in cols) + "<th>reasons</th></tr>")
            for t in s.tensors:
                out.append(
                    f"<tr><td>{esc(t.name)}</td><td class=\"num\">"
                    f"{'' if t.step is None else t.step}</td>"
                    f'<td class="{t.verdict.value}">{t.verdict.value.upper()}</td>' +
                    "".join(f'<td class="num">{esc(cell(t, c))}</td>' for c in cols) +
                    f"<td>{esc('; '.join(t.reasons))}</td></tr>")
            out.append("</table></details>")
        out.append("</section>")
    out += module_html(report.localisation)
    out.append("</body></html>")
    return "\n".join(out) + "\n"
