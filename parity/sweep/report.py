"""A sweep's one report, from its cases' case.json: `sweep.json` (the source of truth),
`index.html` (the matrix: a row per case, a column per stage, each cell coloured by its verdict
with its worst metric, each row linking to the case's own report), `sweep.md` and `junit.xml`
(a testcase per case). Written atomically, like every report of the harness."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Sequence

from sdxl_common.atomic import atomic_write_text

from ..reports.html import CSS, attr, esc
from ..reports.markdown import markdown_table, meta_value
from ..stages import STAGES

SCHEMA_VERSION = 1
SWEEP_JSON, SWEEP_MD, SWEEP_HTML, SWEEP_JUNIT = "sweep.json", "sweep.md", "index.html", "junit.xml"
OK_VERDICTS = ("pass", "warn", "waived")  # as `sdxl-parity run`: warnings and waivers pass
VERDICTS = ("pass", "warn", "waived", "fail", "error", "skip")
FIELD_WIDTH = 48  # characters of a prompt shown in a table cell


def headline(cases: Sequence[Dict[str, Any]]) -> str:
    """`PASS: 12/12 cases` or `FAIL: 2/12 cases failed`."""
    n = len(cases)
    bad = [c for c in cases if c["verdict"] not in OK_VERDICTS]
    if not bad:
        warned = sum(c["verdict"] == "warn" for c in cases)
        return f"PASS: {n}/{n} cases" + (f" ({warned} with warnings)" if warned else "")
    errors = sum(c["verdict"] == "error" for c in bad)
    return f"FAIL: {len(bad)}/{n} cases failed" + (f" ({errors} with an error)" if errors else "")


def build(cases: List[Dict[str, Any]], varying: List[str], meta: Dict[str, Any]) -> Dict:
    """sweep.json's content: the cases in matrix order, counts and how the sweep ran."""
    counts = {v: sum(c["verdict"] == v for c in cases) for v in VERDICTS}
    ok = all(c["verdict"] in OK_VERDICTS for c in cases)
    return {"schema_version": SCHEMA_VERSION, "headline": headline(cases),
            "verdict": "pass" if ok else "fail", "ok": ok,
            "summary": {"cases": len(cases), **counts}, **meta, "varying": varying,
            "stages": [s for s in STAGES if any(s in c.get("stages", {}) for c in cases)],
            "cases": cases}


def write(sweep: Dict, out: Path) -> Dict[str, Path]:
    out = Path(out)
    return {"json": atomic_write_text(out / SWEEP_JSON, json.dumps(sweep, indent=2) + "\n"),
            "md": atomic_write_text(out / SWEEP_MD, render_markdown(sweep)),
            "html": atomic_write_text(out / SWEEP_HTML, render_html(sweep)),
            "junit": atomic_write_text(out / SWEEP_JUNIT, render_junit(sweep))}


def field_text(case: Dict, name: str, width: int = FIELD_WIDTH) -> str:
    """A case's matrix field as a table shows it (cut to `width` characters)."""
    spec = case["spec"]
    if name == "sampler":
        value = "+".join(spec["samplers"])
    elif name == "size":
        value = "default" if spec["height"] is None else f"{spec['height']}x{spec['width']}"
    elif name == "negative_prompt":
        value = spec["negative_prompt"] or "(none)"
    else:
        value = spec[name]
    value = str(value)
    return value if len(value) <= width else value[:width - 3] + "..."


def _meta_rows(sweep: Dict) -> List[List[str]]:
    keys = ("executor", "workers", "wall_seconds", "ran", "skipped_finished", "excluded",
            "sweep_file", "policy", "port", "command", "created")
    return [[k, meta_value(sweep[k], 500)] for k in keys if k in sweep]


def render_html(sweep: Dict) -> str:
    stages, varying = sweep["stages"], sweep["varying"]
    verdict = sweep["verdict"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>SDXL parity sweep: {esc(verdict.upper())}</title>",
           f"<style>{CSS}</style></head><body>",
           f'<h1 class="headline {verdict}">{esc(sweep["headline"])}</h1>',
           "<table><tr>" + "".join(f'<th class="{v}">{v}</th>' for v in VERDICTS) + "</tr><tr>"
           + "".join(f'<td class="num">{sweep["summary"][v]}</td>' for v in VERDICTS)
           + "</tr></table>", '<h2>Cases</h2><table class="matrix"><tr><th>case</th>'
           + "".join(f"<th>{esc(f)}</th>" for f in varying) + "<th>verdict</th>"
           + "".join(f"<th>{esc(s)}</th>" for s in stages)
           + "<th>seconds</th><th>attempts</th><th>headline</th></tr>"]
    for case in sweep["cases"]:
        link = case.get("html")
        name = (f'<a href="{attr(link)}">{esc(case["id"])}</a>' if link
                else esc(case["id"]))
        row = [f"<td>{name}</td>"]
        row += [f'<td title="{attr(field_text(case, f, 10**6))}">{esc(field_text(case, f))}</td>'
                for f in varying]
        row.append(f'<td class="{case["verdict"]}">{case["verdict"].upper()}</td>')
        for s in stages:
            cell = case.get("stages", {}).get(s)
            row.append(f'<td class="{cell["verdict"]}">{cell["verdict"].upper()}<br>'
                       f'<small>{esc(cell["worst"])}</small></td>' if cell else "<td>-</td>")
        row.append(f'<td class="num">{case.get("seconds", "")}</td>'
                   f'<td class="num">{case.get("attempts", "")}</td>'
                   f'<td>{esc(case.get("error") or case.get("headline", ""))}</td>')
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append('</table><h2>Sweep</h2><table class="meta">')
    out += [f"<tr><td>{esc(k)}</td><td><code>{esc(v)}</code></td></tr>"
            for k, v in _meta_rows(sweep)]
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"


def render_markdown(sweep: Dict) -> str:
    stages, varying = sweep["stages"], sweep["varying"]
    lines = [sweep["headline"], ""]
    lines += [f"- {k}: `{v}`" for k, v in _meta_rows(sweep)]
    lines += ["- counts: " + ", ".join(f"{v} {sweep['summary'][v]}" for v in VERDICTS), ""]
    rows = []
    for case in sweep["cases"]:
        name = f"[{case['id']}]({case['report_md']})" if case.get("report_md") else case["id"]
        rows.append([name] + [field_text(case, f) for f in varying] + [case["verdict"].upper()]
                    + [case.get("stages", {}).get(s, {}).get("verdict", "-").upper()
                       for s in stages]
                    + [case.get("attempts", ""), case.get("error") or case.get("headline", "")])
    lines += markdown_table(["case"] + varying + ["verdict"] + list(stages)
                            + ["attempts", "headline"], rows)
    return "\n".join(lines) + "\n"


def render_junit(sweep: Dict, suite_name: str = "sdxl-parity-sweep") -> str:
    """One testcase per case: `<failure>` for a failing case, `<error>` for one whose port
    raised or whose worker kept dying, `<skipped>` for one where nothing was compared."""
    cases = sweep["cases"]
    attrs = {"name": suite_name, "tests": str(len(cases)),
             "failures": str(sweep["summary"]["fail"]), "errors": str(sweep["summary"]["error"]),
             "skipped": str(sweep["summary"]["skip"]),
             "time": f"{float(sweep.get('wall_seconds', 0)):.3f}"}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", dict(attrs, timestamp=sweep.get("created", "")))
    props = ET.SubElement(suite, "properties")
    for key, value in _meta_rows(sweep):
        ET.SubElement(props, "property", {"name": key, "value": value})
    for case in cases:
        tc = ET.SubElement(suite, "testcase", {"classname": suite_name, "name": case["id"],
                                               "time": f"{float(case.get('seconds') or 0):.3f}"})
        bad = [f"{s}: {c['verdict'].upper()} {c['worst']}"
               for s, c in case.get("stages", {}).items() if c["verdict"] in ("fail", "error")]
        if case["verdict"] == "fail":
            ET.SubElement(tc, "failure", {"message": case.get("headline", "failed"),
                                          "type": "ParityFailure"}).text = "\n".join(bad)
        elif case["verdict"] == "error":
            message = case.get("error") or case.get("headline", "error")
            ET.SubElement(tc, "error", {"message": message, "type": "CaseError"}).text = \
                case.get("traceback") or "\n".join(bad) or message
        elif case["verdict"] == "skip":
            ET.SubElement(tc, "skipped", {"message": case.get("headline", "nothing compared")})
        ET.SubElement(tc, "system-out").text = (
            f"report: {case.get('report') or '-'}\nspec: {json.dumps(case['spec'], sort_keys=True)}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
