"""`sdxl-parity sweep`: a matrix of parity cases (prompts x seeds x samplers x schedules x steps
x guidance x dtypes x sizes), each recorded and checked in worker processes, on a local pool or
a Ray cluster, with one combined report.

`sweep_file` reads and validates the sweep file, `matrix` expands it into cases, `cases` holds
what a worker does for one case, `executors` where the workers run, `report` the combined
report; `run_sweep` here ties them together. A sweep folder is resumable: every finished case
leaves `cases/<id>/case.json` (written atomically, last), and a rerun skips each case whose
case.json holds the same spec.
"""
from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from sdxl_common.atomic import atomic_write_text
from sdxl_common.progress import bar as progress_bar

from . import report
from .cases import CASE_JSON, CaseTask, attempts, read_case, reset_starts
from .executors import checkpoint_bytes, make_executor, plan_workers
from .matrix import Sweep
from .sweep_file import load_sweep

__all__ = ["SweepOptions", "SweepResult", "load_sweep", "run_sweep"]


@dataclass
class SweepOptions:
    out: Path
    executor: str = "local"  # or "ray"
    address: Optional[str] = None  # a Ray cluster; None starts a local one
    workers: Optional[int] = None  # None: from cores and memory (`plan_workers`)
    max_retries: int = 2  # per step, after its worker died
    command: str = "sdxl-parity sweep"
    waivers: Optional[str] = None  # a waiver file (absolute path), applied to every case


@dataclass
class SweepResult:
    sweep: Dict[str, Any]  # sweep.json's content
    paths: Dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.sweep["ok"])

    @property
    def headline(self) -> str:
        return self.sweep["headline"]


def run_sweep(sweep: Sweep, options: SweepOptions,
              log: Callable[[str], None] = lambda s: None) -> SweepResult:
    """Run every case of `sweep` not finished in `options.out` already, then write the
    combined report over all of them."""
    from ..recording import resolve_checkpoint

    start = time.perf_counter()
    out = Path(options.out)
    # the seeded checkpoints are made here, once: two workers making the same one at once
    # would each replace the other's folder while it is being read
    checkpoints = {c.run.checkpoint_source(): resolve_checkpoint(c.run) for c in sweep.cases}
    done: Dict[str, Dict[str, Any]] = {}
    todo: List[CaseTask] = []
    rerun = 0
    for case in sweep.cases:
        folder = out / "cases" / case.id
        previous = read_case(folder)
        if previous and previous.get("spec") == _json(case.spec()):
            if "error" not in previous:
                done[case.id] = previous
                continue
            rerun += 1  # the worker kept dying, or the harness raised: worth another go
        reset_starts(folder)
        todo.append(CaseTask(id=case.id, spec=case.spec(), folder=str(folder.resolve()),
                             policy=sweep.policy_path, port=sweep.port_path,
                             command=options.command, waivers=options.waivers))
    plan = plan_workers(max(checkpoint_bytes(p) for p in checkpoints.values()),
                        any(t.spec["truth"] for t in todo), len(todo), options.workers)
    executor = make_executor(options.executor, plan, sweep.resources, options.address,
                             options.max_retries, log)
    log(f"{plural(len(sweep.cases), 'case')} ({sweep.excluded} excluded) from {sweep.source}")
    if done:
        log(f"skipped {len(done)} finished cases (their case.json holds the same spec)")
    if rerun:
        log(f"rerunning {plural(rerun, 'case')} that ended in an error")
    if todo:
        log(f"running {plural(len(todo), 'case')} on {executor.name}: {plan.describe()}")
    progress = _Progress(len(todo), log)
    results = dict(done)

    def finish(task: CaseTask, result: Dict[str, Any]) -> None:
        entry = _write_case(task, result, out)
        results[task.id] = entry
        progress.done(entry)

    try:
        if todo:
            executor.run(todo, finish)
    except KeyboardInterrupt:
        log(f"interrupted: {plural(len(results), 'finished case')} kept in {out / 'cases'}; "
            "the same command resumes the sweep")
        raise
    finally:
        progress.close()
    missing = [c.id for c in sweep.cases if c.id not in results]
    if missing:  # an executor that lost a case is a bug of this tool, never a silent gap
        raise RuntimeError(f"the executor returned no result for {len(missing)} cases: "
                           f"{', '.join(missing[:5])}")
    cases = [results[c.id] for c in sweep.cases]  # each case once, in matrix order
    meta = {"executor": executor.name, "address": options.address, "workers": plan.workers,
            "reuse_workers": plan.reuse, "wall_seconds": round(time.perf_counter() - start, 1),
            "case_seconds": round(sum(float(c.get("seconds") or 0) for c in cases), 1),
            "ran": len(todo), "skipped_finished": len(done), "excluded": sweep.excluded,
            "sweep_file": sweep.source, "policy": sweep.cases[0].policy,
            "port": sweep.cases[0].port, "command": options.command,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    document = report.build(cases, sweep.varying(), meta)
    return SweepResult(document, report.write(document, out))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _write_case(task: CaseTask, result: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """The case's case.json, written atomically and last: its presence means finished."""
    rel = f"cases/{task.id}"
    entry: Dict[str, Any] = {"id": task.id, "spec": _json(task.spec)}
    record = result.get("record") or {}
    if result.get("ok"):
        entry.update(verdict=result["verdict"], report=f"{rel}/report.json",
                     html=f"{rel}/index.html", report_md=f"{rel}/report.md",
                     headline=result["headline"], stages=result["stages"])
    else:
        entry.update(verdict="error", report=None, error=result.get("error", "unknown error"))
        if result.get("traceback"):
            entry["traceback"] = result["traceback"]
    entry.update(seconds=round(float(record.get("seconds", 0)) + float(result.get("seconds", 0)),
                               2),
                 attempts=attempts(Path(task.folder)), recording=f"{rel}/recording",
                 record_reused=bool(record.get("reused", False)))
    atomic_write_text(Path(task.folder) / CASE_JSON, json.dumps(entry, indent=2) + "\n")
    return entry


class _Progress:
    """A line per finished case (`[3/12] PASS <id> ...`, with the time left at the rate so
    far) and a bar on a terminal."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.count, self.log = total, 0, log
        self.start = time.perf_counter()
        self.bar = progress_bar(total=total, desc="sweep: cases", unit="case", leave=False)

    def done(self, entry: Dict[str, Any]) -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.count * (self.total - self.count)
        retried = f", {entry['attempts']} attempts" if entry["attempts"] > 1 else ""
        what = entry.get("error") or entry.get("headline", "")
        line = (f"[{self.count}/{self.total}] {entry['verdict'].upper()} {entry['id']} "
                f"({entry['seconds']:.1f} s{retried}; {elapsed:.0f} s elapsed, about "
                f"{left:.0f} s left): {what}")
        with self.bar.external_write_mode(file=sys.stderr):
            self.log(line)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
