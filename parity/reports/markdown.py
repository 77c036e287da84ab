"""`report.md`: the headline as line 1, a summary table, then one table per stage.

Also holds the table layout (which metric columns a stage shows) shared with `html.py`.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from parity.metrics import ExactMetrics, ImageMetrics, TensorMetrics, format_value
from parity.results import ParityReport, StageResult, TensorResult

from .modules import markdown_lines as module_markdown

# Columns shown per metrics kind, in order (the CSV has all of them).
DISPLAY_COLUMNS = {
    TensorMetrics: ("rel_l2", "cosine", "max_abs", "mean_abs", "max_rel", "psnr_db",
                    "mismatch_ratio"),
    ImageMetrics: ("psnr_db", "ssim", "max_abs_255", "mean_abs_255"),
    ExactMetrics: ("mismatches", "mismatch_ratio"),
}


def stage_columns(tensors: Sequence[TensorResult]) -> List[str]:
    """Union of the display columns of the metric kinds present, in first-seen order."""
    cols: List[str] = []
    for t in tensors:
        for c in DISPLAY_COLUMNS.get(type(t.metrics), ()):
            if c not in cols:
                cols.append(c)
    return cols


def cell(t: TensorResult, column: str) -> str:
    """Formatted value of `column` for `t`, or "" when its metrics lack that column."""
    v = getattr(t.metrics, column, None)
    if v is None:
        return ""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return format_value(v)


def first_failure_text(stage: StageResult) -> str:
    if stage.error:
        return f"the port raised {stage.error}"
    if stage.first_failure is None:
        return "-"
    name, step = stage.first_failure
    t = stage.find(name, step)
    where = f"{name}" if step is None else f"{name}, step {step}"
    return f"{where}: {t.reasons[0]}" if t is not None and t.reasons else where


def meta_value(v: Any, limit: int = 300) -> str:
    """Short one-line rendering of a meta value."""
    s = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _md(text: Any) -> str:
    """Escape a table cell: pipes and newlines would break the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    out = ["| " + " | ".join(_md(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return out


SUMMARY_HEADER = ["stage", "verdict", "worst metric", "first failure"]


def summary_rows(report: ParityReport) -> List[List[str]]:
    return [[s.name, s.verdict.value.upper(), s.worst_metric(), first_failure_text(s)]
            for s in report.ordered_stages()]


def summary_table(report: ParityReport) -> str:
    """The summary as an aligned plain-text table, for terminals."""
    rows = [SUMMARY_HEADER] + summary_rows(report)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(SUMMARY_HEADER))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]])


def waiver_lines(report: ParityReport) -> List[str]:
    """The known deviations a waiver file accepted, and its problems, apart from the stages."""
    w = report.waivers
    if w is None:
        return []
    lines = ["", f"## Waivers (`{w['file']}`)", ""]
    if w["applied"]:
        lines += markdown_table(
            ["stage", "tensor", "step", "waiver", "owner", "expires", "reason"],
            [[a["stage"], a["tensor"], "" if a["step"] is None else a["step"], a["waiver"],
              a["owner"], a["expires"], a["reason"]] for a in w["applied"]])
    else:
        lines.append("- nothing waived")
    lines += [f"- **problem**: {p}" for p in w["problems"]]
    return lines


def render_markdown(report: ParityReport, image_paths: Optional[Dict[str, str]] = None) -> str:
    """Markdown text of `report`. `image_paths` maps a stored image path to the path to link
    (when the Markdown file is written somewhere else than the report directory)."""
    image_paths = image_paths or {}
    lines = [report.headline(), ""]
    lines.append(f"- verdict: **{report.verdict.value.upper()}**")
    lines.append(f"- created: {report.created}")
    for key in sorted(report.meta):
        lines.append(f"- {key}: `{meta_value(report.meta[key])}`")
    lines += ["", "## Summary", ""]
    stages = report.ordered_stages()
    lines += markdown_table(SUMMARY_HEADER, summary_rows(report))
    lines += waiver_lines(report)
    for s in stages:
        lines += ["", f"## Stage `{s.name}`: {s.verdict.value.upper()}", ""]
        if s.error:
            lines.append(f"- error: the port raised `{s.error}` (traceback in report.json)")
        for note in s.notes:
            lines.append(f"- note: {note}")
        if s.limits:
            lines.append("- policy bounds: " + ", ".join(
                f"{k} warn {v['warn']:g} / fail {v['fail']:g}" for k, v in s.limits.items()))
        if s.notes or s.limits or s.error:
            lines.append("")
        if s.images:
            lines.append(" ".join(f"![{role}]({image_paths.get(p, p)})"
                                  for role, p in s.images.items()))
            lines.append("")
        if s.tensors:
            cols = stage_columns(s.tensors)
            rows = [[t.name, "" if t.step is None else t.step, t.verdict.value.upper()]
                    + [cell(t, c) for c in cols] + ["; ".join(t.reasons)] for t in s.tensors]
            lines += markdown_table(["tensor", "step", "verdict"] + cols + ["reasons"], rows)
        if s.per_step:
            names = list(s.per_step)
            n = max(len(v) for v in s.per_step.values())
            lines += ["", "Per-step series:", ""]
            lines += markdown_table(["step"] + names, [
                [i] + [format_value(s.per_step[k][i]) if i < len(s.per_step[k]) else ""
                       for k in names] for i in range(n)])
    lines += module_markdown(report.localisation)
    return "\n".join(lines) + "\n"
