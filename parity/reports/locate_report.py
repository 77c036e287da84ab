"""`sdxl-parity locate`'s own report folder: report.json, report.md and index.html, each
written atomically."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from sdxl_common.atomic import atomic_write_text

from parity.results import module_headline

from .modules import html_sections, markdown_lines, unpaired_text
from .json_report import jsonable


def locate_headline(localisation: List[Dict[str, Any]]) -> str:
    first: Optional[Dict[str, Any]] = next(
        (loc["first_divergent_module"] for loc in localisation if loc["first_divergent_module"]),
        None)
    if first is not None:
        return module_headline(first)
    wiring = next((loc for loc in localisation if loc.get("divergence")), None)
    if wiring is not None:
        where = "" if wiring.get("step") is None else f", step {wiring['step']}"
        return f"FAIL at stage '{wiring['stage']}'{where}: {wiring['divergence']['text']}"
    alone = next((loc for loc in localisation if not loc["modules"]
                  and loc.get("unpaired", {}).get("reference_modules")), None)
    if alone is not None:
        return f"UNPAIRED at stage '{alone['stage']}': {unpaired_text(alone)}"
    counted = ", ".join(f"{loc['stage']} {len(loc['modules'])}" for loc in localisation)
    return f"PASS: no module over its bound (modules compared: {counted})"


def write_locate_reports(localisation: List[Dict[str, Any]], out_dir: Path,
                         meta: Dict[str, Any]) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headline = locate_headline(localisation)
    first = next((loc["first_divergent_module"] for loc in localisation
                  if loc["first_divergent_module"]), None)
    doc = {"headline": headline, "first_divergent_module": first, "meta": meta,
           "localisation": localisation}
    atomic_write_text(out_dir / "report.json",
                      json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")
    md = [headline, ""] + [f"- {k}: `{v}`" for k, v in sorted(meta.items())]
    atomic_write_text(out_dir / "report.md", "\n".join(md + markdown_lines(localisation)) + "\n")
    page = ['<!doctype html><html><head><meta charset="utf-8">'
            "<title>sdxl-parity locate</title></head><body>",
            f"<h1>{html.escape(headline)}</h1><ul>"
            + "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>"
                      for k, v in sorted(meta.items())) + "</ul>"]
    page += html_sections(localisation)
    page.append("</body></html>")
    atomic_write_text(out_dir / "index.html", "\n".join(page) + "\n")
    return headline
