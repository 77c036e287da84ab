"""One measurement in a fresh process: `python -m benchmarks.measure --spec JSON --result PATH`.

A fresh process per (component, side, mode) keeps memory peaks clean: `ru_maxrss` is the
high-water mark of this process alone, and neither framework's allocator caches leak into the
other side's figure. The process builds the workload, times the first call apart (graph
compilation lands there), runs the remaining warm-up calls, times `rounds` calls one by one and
writes a JSON record (`measure` returns the same dict, for in-process use by the test suite).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .workloads import Spec, Workload, build, device_peak_bytes, import_framework, modes_for


def rss_bytes() -> int:
    """Current resident set size."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a test dependency, /proc is Linux's
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def timed_call(fn) -> float:
    """Wall seconds of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(spec: Spec) -> Dict[str, Any]:
    """Build, warm up and time one workload; returns the measurement record."""
    if spec.checkpoint and not Path(spec.checkpoint).exists():  # fail before the slow imports
        raise FileNotFoundError(f"checkpoint {spec.checkpoint} does not exist")
    import_framework(spec.side)  # so that loaded - baseline is the model's own memory
    baseline_rss = rss_bytes()
    t0 = time.perf_counter()
    workload = build(spec)
    load_s = time.perf_counter() - t0
    loaded_rss = rss_bytes()

    calls: List[float] = []
    for _ in range(spec.warmup):
        calls.append(timed_call(workload.call))
    samples = [timed_call(workload.call) for _ in range(spec.rounds)]
    return make_record(spec, workload, samples, calls, first_call_s=(calls or samples)[0],
                       load_s=load_s, baseline_rss=baseline_rss, loaded_rss=loaded_rss)


def make_record(spec: Spec, workload: Workload, samples: List[float], warmup_s: List[float],
                first_call_s: float, load_s: Optional[float], baseline_rss: Optional[int],
                loaded_rss: Optional[int]) -> Dict[str, Any]:
    """The measurement record `report.benchmark_entry` turns into a pytest-benchmark entry.

    compile_s: for modes that compile (graph/jit), the first call's excess over the
    steady-state median; None for eager/PyNative modes, whose first call compiles nothing."""
    compiles = modes_for(spec.side)[spec.mode].compiles
    return {
        "spec": json.loads(spec.to_json()),
        "samples_s": list(samples),
        "warmup_s": list(warmup_s),
        "first_call_s": first_call_s,
        "compile_s": max(first_call_s - statistics.median(samples), 0.0) if compiles else None,
        "load_s": load_s,
        "baseline_rss_bytes": baseline_rss,
        "loaded_rss_bytes": loaded_rss,
        # the kernel updates ru_maxrss lazily: an RSS read earlier can stand above it
        "peak_rss_bytes": max([peak_rss_bytes()] + [r for r in (baseline_rss, loaded_rss) if r]),
        "device_peak_bytes": device_peak_bytes(spec.side, spec.device),
        "flops": spec.flops(),
        "weights": spec.weights_note(),
        **workload.info,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure",
                                     description="one benchmark measurement (used by sdxl-bench)")
    parser.add_argument("--spec", required=True, help="a workloads.Spec as JSON")
    parser.add_argument("--result", required=True, help="where to write the measurement JSON")
    args = parser.parse_args(argv)
    return run_child(args.spec, args.result, measure)


def run_child(spec_json: str, result: str, work: Callable[[Spec], Dict[str, Any]]) -> int:
    """The child's side of `runner.run_spec_in_subprocess`: `work` on the spec, its record
    written to `result` as JSON; on failure the traceback, then the one line the runner
    shows, and exit status 1."""
    try:
        record = work(Spec.from_json(spec_json))
    except Exception as exc:  # the runner shows the last line; the traceback goes to stderr
        traceback.print_exc()
        print(f"measurement failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    from sdxl_common.atomic import atomic_write_text

    atomic_write_text(result, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
