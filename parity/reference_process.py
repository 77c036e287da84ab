"""The reference records in a process of its own, so it and the port are never resident together.

At sdxl-base each side holds ~14 GB of float32 weights; torch's allocator does not hand freed
memory back to the system promptly, so recording and checking in one process peaked at the sum
(*measured* 23.4 GB at 256x256 on a 24 GiB machine). `record_isolated` runs `record` (and the
truth) in a spawned child that writes the recording folder and exits; the parent, which never
imports torch, then loads the port. The child's peak resident memory comes back with it.
"""
from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

from . import eta
from .recording import Recording, RunSpec


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def record_to_folder(spec: RunSpec, checkpoint, folder: Path, *, truth: bool = False,
                     modules: bool = False, sampler=None, step=None,
                     log=lambda what: None, run_units: Optional[float] = None,
                     module_truth: bool = False) -> Recording:
    """Record the reference into `folder`: the stages, then (`modules`) every module's
    tensors, with each module's float64 truth when `truth` or `module_truth`, then (`truth`)
    the stages' float64 truth, whose float64 pipeline is loaded only once the working-precision
    reference is released, so the two are never resident together (`module_truth` alone needs
    no float64 pipeline: what measures module floors at sdxl-base on a 24 GiB host). Progress lines carry the
    run's elapsed and remaining time (`parity.eta`); `run_units` is the whole run's work when
    the recording is only its first part."""
    plan = eta.RunPlan.for_run(spec.samplers, spec.steps, truth=truth)
    eta.start(eta.RunClock(run_units or plan.reference + plan.truth))
    log = _with_eta(log)
    try:
        return _record(spec, checkpoint, folder, truth, modules, sampler, step, log,
                       module_truth)
    finally:
        eta.start(None)


def _with_eta(log):
    return lambda what: log(what + eta.summary())


def _record(spec, checkpoint, folder, truth, modules, sampler, step, log,
            module_truth=False) -> Recording:
    import tempfile

    from .reference_run import load_truth, record, record_truth
    from .reference import load_reference

    ref = load_reference(checkpoint, dtype=spec.dtype)
    rec = record(spec, checkpoint, reference=ref, progress=log)
    with tempfile.TemporaryDirectory(prefix="sdxl-parity-modules-") as work:
        if modules:
            from .locate import record_modules

            # module truths come from float64 copies of one module at a time
            record_modules(rec, ref, checkpoint, Path(work), sampler=sampler, step=step,
                           log=log, truth=truth or module_truth)
        del ref
        if truth:
            record_truth(rec, checkpoint, truth=load_truth(checkpoint, spec.dtype), progress=log)
        rec.save(Path(folder))  # module captures are copied in from `work`
    return rec


def _record_child(spec: Dict, checkpoint: str, folder: str, truth: bool, modules: bool,
                  quiet: bool, run_units: Optional[float], module_truth: bool = False) -> Dict:
    start = time.perf_counter()

    def log(what: str) -> None:
        if not quiet:
            print(f"[sdxl-parity] reference: {what}", file=sys.stderr)

    record_to_folder(RunSpec.from_dict(spec), checkpoint, Path(folder), truth=truth,
                     modules=modules, log=log, run_units=run_units, module_truth=module_truth)
    return {"seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": peak_rss_bytes()}


def record_isolated(spec: RunSpec, checkpoint: Path, folder: Path, *, truth: bool = False,
                    modules: bool = False, quiet: bool = False,
                    run_units: Optional[float] = None,
                    module_truth: bool = False) -> Tuple[Recording, Dict]:
    """Record in a spawned process; returns the recording (loaded from `folder`) and the
    child's {"seconds", "peak_rss_bytes"}."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        stats = pool.submit(_record_child, asdict(spec), str(checkpoint), str(folder), truth,
                            modules, quiet, run_units, module_truth).result()
    return Recording.load(folder), stats
