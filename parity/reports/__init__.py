"""Report writers. One `ParityReport`, many renderings, each written atomically:

* `report.json`  - source of truth (schema in `parity.reports.json_report`)
* `report.md`    - headline on line 1, summary table, per-stage tables
* `index.html`   - single self-contained page: summary, SVG per-step plots, embedded images
* `metrics.csv`  - one row per compared tensor, with msprobe's column names
* JUnit XML      - one testcase per stage, when a path is given

`render_from_json` rebuilds the Markdown and HTML from `report.json` alone
(`sdxl-parity report DIR`).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, Optional

from sdxl_common.atomic import atomic_open, atomic_write_text
from parity.metrics import MSPROBE_COLUMNS, TensorMetrics
from parity.reports.html import render_html
from parity.reports.json_report import read_json, write_json
from parity.reports.junit import render_junit
from parity.reports.markdown import render_markdown
from parity.reports.plots import line_chart_svg, write_image_triplet
from parity.results import ParityReport

__all__ = ["write_reports", "render_from_json", "write_csv", "write_json", "read_json",
           "render_markdown", "render_html", "render_junit", "line_chart_svg",
           "write_image_triplet", "CSV_COLUMNS"]

REPORT_JSON, REPORT_MD, REPORT_HTML, REPORT_CSV = ("report.json", "report.md", "index.html",
                                                   "metrics.csv")

CSV_COLUMNS = (
    "stage", "tensor", "step", "verdict", "kind", "shape", "numel",
    "rel_l2", "cosine", "max_abs", "mean_abs", "max_rel", "psnr_db", "mismatch_ratio",
    "mismatches", "ratio_rel_err_le_1e3", "ratio_rel_err_le_5e3", "rtol", "atol",
    "ssim", "max_abs_255", "mean_abs_255", "nonfinite_port", "nonfinite_ref",
) + MSPROBE_COLUMNS + ("reasons",)


def write_csv(report: ParityReport, path: os.PathLike | str) -> Path:
    """One row per compared tensor; empty cells where a metric does not apply. Floats are
    written at full precision (repr)."""
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for stage in report.ordered_stages():
            for t in stage.tensors:
                m = t.metrics
                row = {"stage": stage.name, "tensor": t.name,
                       "step": "" if t.step is None else t.step, "verdict": t.verdict.value,
                       "kind": m.kind, "shape": "x".join(str(s) for s in m.shape),
                       "reasons": "; ".join(t.reasons)}
                for c in CSV_COLUMNS:
                    if c not in row and hasattr(m, c):
                        row[c] = repr(getattr(m, c))
                if isinstance(m, TensorMetrics):
                    row.update({k: repr(v) for k, v in m.msprobe().items()})
                w.writerow(row)
    return Path(path)


def _render(report: ParityReport, out_dir: Path, image_base: Path,
            junit_xml: Optional[os.PathLike | str]) -> Dict[str, Path]:
    image_paths = {}
    if image_base.resolve() != out_dir.resolve():
        image_paths = {p: Path(os.path.relpath(image_base / p, out_dir)).as_posix()
                       for s in report.stages.values() for p in s.images.values()}
    paths = {
        "md": atomic_write_text(out_dir / REPORT_MD, render_markdown(report, image_paths)),
        "html": atomic_write_text(out_dir / REPORT_HTML, render_html(report, image_base)),
    }
    if junit_xml is not None:
        paths["junit"] = atomic_write_text(junit_xml, render_junit(report))
    return paths


def write_reports(report: ParityReport, out_dir: os.PathLike | str,
                  junit_xml: Optional[os.PathLike | str] = None,
                  csv_name: Optional[str] = REPORT_CSV) -> Dict[str, Path]:
    """Write report.json, report.md, index.html and metrics.csv (skip with `csv_name=None`)
    into `out_dir`, plus JUnit XML at `junit_xml` if given. Image paths in the stages are
    relative to `out_dir`. Returns {"json", "md", "html", "csv", "junit"} -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(report, out_dir / REPORT_JSON)}
    if csv_name:
        paths["csv"] = write_csv(report, out_dir / csv_name)
    paths.update(_render(report, out_dir, out_dir, junit_xml))
    return paths


def render_from_json(report_json_path: os.PathLike | str,
                     out_dir: Optional[os.PathLike | str] = None,
                     junit_xml: Optional[os.PathLike | str] = None) -> Dict[str, Path]:
    """Re-render report.md and index.html (and JUnit if asked) from a report.json. Images are
    read relative to the JSON's directory; `out_dir` defaults to that directory."""
    report_json_path = Path(report_json_path)
    report = read_json(report_json_path)
    out_dir = Path(out_dir) if out_dir is not None else report_json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return _render(report, out_dir, report_json_path.parent, junit_xml)
