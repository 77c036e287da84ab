"""The two steps of a sweep case, as they run inside a worker process (local pool or Ray).

`record_step` records the reference into `<case>/recording`; `check_step` checks the port
against it and writes the case's own report (index.html, report.json, report.md) into
`<case>/`. Both are idempotent, so an executor may rerun either after its worker died: the
recording appears by an atomic rename (a half-written one from a killed attempt is cleared
first, a complete one with the same spec is kept), the reports are rewritten whole. A step
returns plain data and never raises for the case's own errors (those are the case's verdict
`error`); only a dead worker reaches the executor, which retries it. Each start is logged in
`<case>/.starts-<step>`, which is how attempts are counted whatever executor retried it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

CASE_JSON, RECORDING = "case.json", "recording"
STEPS = ("record", "check")


@dataclass(frozen=True)
class CaseTask:
    """What a worker needs for one case: plain data, so any executor can ship it."""

    id: str
    spec: Dict[str, Any]  # `Case.spec()`: the RunSpec's fields plus policy, port, stages, truth
    folder: str  # DIR/cases/<id>
    policy: str  # what load_policy takes (a packaged name or an absolute path)
    port: str  # MODULE:FACTORY, a .py path made absolute
    command: str  # the sweep's command line, recorded in the case's report
    waivers: Optional[str] = None  # a waiver file's absolute path (`--waivers`)

    @property
    def recording(self) -> Path:
        return Path(self.folder) / RECORDING


def starts_file(folder: os.PathLike, step: str) -> Path:
    return Path(folder) / f".starts-{step}"


def starts(folder: os.PathLike, step: str) -> int:
    """How many times `step` of the case in `folder` was started (0 if never)."""
    try:
        return len(starts_file(folder, step).read_text().split())
    except FileNotFoundError:
        return 0


def attempts(folder: os.PathLike) -> int:
    """The case's first try plus every retry of its record or check."""
    return 1 + sum(max(0, starts(folder, step) - 1) for step in STEPS)


def reset_starts(folder: os.PathLike) -> None:
    for step in STEPS:
        with contextlib.suppress(FileNotFoundError):
            starts_file(folder, step).unlink()


def record_step(task: CaseTask) -> Dict[str, Any]:
    """Record the case's reference (in a worker)."""
    return _step(task, "record", _record)


def check_step(task: CaseTask, recorded: Dict[str, Any]) -> Dict[str, Any]:
    """Check the port against the case's recording (in a worker); `recorded` is what
    `record_step` returned, passed through when it is an error."""
    if not recorded.get("ok"):
        return recorded
    result = _step(task, "check", _check)
    return {**result, "record": recorded}


def _step(task: CaseTask, step: str, body) -> Dict[str, Any]:
    from sdxl_common import progress

    folder = Path(task.folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(starts_file(folder, step), "a") as f:  # before any work: a crash still counts
        f.write(f"{os.getpid()}\n")
    progress.set_enabled(False)  # many workers share one console: their output goes to the log
    start = time.perf_counter()
    with _output_to(folder / f"{step}.log", f"{step} of {task.id}, attempt "
                                            f"{starts(folder, step)}, pid {os.getpid()}"):
        try:
            out = body(task, lambda what: print(f"[sdxl-parity] {step}: {what}",
                                                file=sys.stderr, flush=True))
            out["ok"] = True
        except Exception as e:  # noqa: BLE001 - the case's error, reported in its row
            from sdxl_common.cli import one_line

            traceback.print_exc()
            out = {"ok": False, "error": f"{step}: {type(e).__name__}: {one_line(e)}",
                   "traceback": traceback.format_exc()}
    out.update(step=step, seconds=round(time.perf_counter() - start, 2))
    return out


@contextlib.contextmanager
def _output_to(path: Path, header: str) -> Iterator[None]:
    """File descriptors 1 and 2 (Python's, and every library's and native thread's output)
    appended to `path` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"=== {header} ===\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _record(task: CaseTask, log) -> Dict[str, Any]:
    from ..reference_process import peak_rss_bytes, record_to_folder
    from ..recording import RunSpec
    from ..recording import resolve_checkpoint

    spec = RunSpec.from_dict(task.spec)
    folder = task.recording
    if _reusable(folder, task.spec):
        log(f"reusing the complete recording in {folder}")
        return {"reused": True}
    _clear(folder)
    checkpoint = resolve_checkpoint(spec)
    log(f"recording the reference on {checkpoint}")
    record_to_folder(spec, checkpoint, folder, truth=bool(task.spec["truth"]), log=log)
    return {"reused": False, "peak_rss_bytes": peak_rss_bytes()}


def _reusable(folder: Path, spec: Dict[str, Any]) -> bool:
    """A complete recording of this very spec (and its truth, when asked) from an earlier
    attempt: its manifest agrees and its tensors match their checksum."""
    from dataclasses import asdict

    from ..recording import MANIFEST, Recording, RecordingError, RunSpec

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        wanted = json.loads(json.dumps(asdict(RunSpec.from_dict(spec))))
        if manifest.get("spec") != wanted or (spec["truth"] and
                                              "truth" not in manifest.get("meta", {})):
            return False
        Recording.load(folder)
        return True
    except (OSError, ValueError, RecordingError):
        return False


def _clear(folder: Path) -> None:
    """What a killed attempt may have left: the temporary sibling of a recording being
    written, or a folder that is not a complete recording."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if folder.exists():
        shutil.rmtree(folder)


def _check(task: CaseTask, log) -> Dict[str, Any]:
    from ..reference_process import peak_rss_bytes
    from ..policy import load_policy
    from ..ports import PortSpec
    from ..recording import Recording
    from ..runner import check

    from ..waivers import load_waivers

    rec = Recording.load(task.recording)
    report = check(rec, Path(task.folder), policy=load_policy(task.policy),
                   port_spec=PortSpec.parse(task.port), stages=tuple(task.spec["stages"]),
                   log=log, command=f"{task.command}  # case {task.id}",
                   waivers=load_waivers(task.waivers) if task.waivers else None)
    log(report.headline())
    return {"verdict": report.verdict.value, "headline": report.headline(),
            "stages": {s.name: {"verdict": s.verdict.value, "worst": s.worst_metric()}
                       for s in report.ordered_stages()},
            "peak_rss_bytes": peak_rss_bytes()}


def read_case(folder: os.PathLike) -> Optional[Dict[str, Any]]:
    """A case's case.json, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((Path(folder) / CASE_JSON).read_text())
    except (OSError, ValueError):
        return None
