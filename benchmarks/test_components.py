"""Each component on each side, timed by pytest-benchmark (`pytest benchmarks/`).

The workloads are the ones `sdxl-bench` runs in fresh processes (benchmarks.workloads), and the
extra_info carries the same fields, so both produce comparable JSON.
"""
from __future__ import annotations

import time

from benchmarks.measure import make_record, rss_bytes
from benchmarks.report import benchmark_entry
from benchmarks.workloads import build, import_framework


def test_component(benchmark, spec_for, component, side, mode):
    spec = spec_for(component, side, mode)
    import_framework(side)
    baseline = rss_bytes()
    t0 = time.perf_counter()
    workload = build(spec)
    load_s = time.perf_counter() - t0
    loaded = rss_bytes()
    t0 = time.perf_counter()
    workload.call()  # the first call, timed apart (graph modes compile here)
    first_call_s = time.perf_counter() - t0

    benchmark.group = component
    benchmark.pedantic(workload.call, rounds=spec.rounds, iterations=1,
                       warmup_rounds=max(spec.warmup - 1, 0))
    if benchmark.stats is None:  # --benchmark-disable
        return
    samples = list(benchmark.stats.stats.data)
    record = make_record(spec, workload, samples, [first_call_s], first_call_s, load_s,
                         baseline, loaded)
    benchmark.extra_info.update(benchmark_entry(record)["extra_info"])
    benchmark.extra_info["rss_isolated"] = False  # both frameworks live in this process
