"""JUnit XML: one testsuite, one testcase per stage, so CI shows the parity run as a test list.

FAIL stages carry a `<failure>` (message = first failure, body = every failing comparison),
ERROR stages (the port raised) an `<error>` with the traceback, SKIP stages a `<skipped>`, and
WARN stages pass with their warnings in `<system-out>`. Each testcase's `time` is the stage's
wall time in seconds.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from parity.reports.markdown import first_failure_text, meta_value
from parity.results import ParityReport, Verdict

MAX_BODY_LINES = 200


def _lines(stage, verdict: Verdict):
    out = []
    for t in stage.tensors:
        if t.verdict == verdict:
            where = t.name if t.step is None else f"{t.name} step {t.step}"
            out.append(f"{where}: {'; '.join(t.reasons)}")
    if len(out) > MAX_BODY_LINES:
        out = out[:MAX_BODY_LINES] + [f"... {len(out) - MAX_BODY_LINES} more"]
    return out


def render_junit(report: ParityReport, suite_name: str = "sdxl-parity") -> str:
    stages = report.ordered_stages()
    problems = report.waiver_problems()  # each a failing test case of its own
    n_fail = sum(s.verdict == Verdict.FAIL for s in stages) + len(problems)
    n_error = sum(s.verdict == Verdict.ERROR for s in stages)
    n_skip = sum(s.verdict == Verdict.SKIP for s in stages)
    seconds = report.meta.get("stage_seconds") or {}
    attrs = {"name": suite_name, "tests": str(len(stages) + len(problems)),
             "failures": str(n_fail),
             "errors": str(n_error), "skipped": str(n_skip),
             "time": f"{sum(float(v) for v in seconds.values()):.3f}"}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", dict(attrs, timestamp=report.created))
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "headline", "value": report.headline()})
    for key in sorted(report.meta):
        ET.SubElement(props, "property", {"name": str(key), "value": meta_value(report.meta[key])})
    for problem in problems:
        case = ET.SubElement(suite, "testcase", {"classname": suite_name, "name": "waivers",
                                                 "time": "0.000"})
        ET.SubElement(case, "failure", {"message": problem, "type": "WaiverProblem"})
    for s in stages:
        case = ET.SubElement(suite, "testcase", {"classname": suite_name, "name": s.name,
                                                 "time": f"{float(seconds.get(s.name, 0)):.3f}"})
        if s.verdict == Verdict.ERROR:
            kind = (s.error or "Exception").partition(":")[0]
            err = ET.SubElement(case, "error", {"message": f"stage '{s.name}': the port raised "
                                                           f"{s.error}", "type": kind})
            err.text = s.traceback or s.error or ""
        elif s.verdict == Verdict.FAIL:
            msg = first_failure_text(s)
            if msg == "-":
                msg = s.notes[0] if s.notes else "stage failed"
            fail = ET.SubElement(case, "failure", {"message": f"stage '{s.name}': {msg}",
                                                   "type": "ParityFailure"})
            fail.text = "\n".join(_lines(s, Verdict.FAIL) + [f"note: {n}" for n in s.notes])
        elif s.verdict == Verdict.SKIP:
            ET.SubElement(case, "skipped", {"message": "; ".join(s.notes) or "not run"})
        elif s.verdict == Verdict.WAIVED:  # JUnit has no xfail: pytest writes it as skipped
            ET.SubElement(case, "skipped", {"type": "pytest.xfail", "message": "waived: " + (
                "; ".join(_lines(s, Verdict.WAIVED)) or "known deviation")})
        out = [f"worst: {s.worst_metric()}"] + _lines(s, Verdict.WARN)
        ET.SubElement(case, "system-out").text = "\n".join(out)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
