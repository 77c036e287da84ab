"""Measurement records -> pytest-benchmark JSON (`results.json`), `results.md`, `ratios.png`.

`results.json` is pytest-benchmark's format (`machine_info`, `commit_info`, `benchmarks`
entries with `name`, `group`, `stats`, `extra_info`, ...), so its tools (`pytest-benchmark
compare`) read it, plus two top-level keys of ours: `ratios` (port median / reference median
per component and port mode, both measured in the same run) and `run` (the settings).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .flops import COMPONENTS

PYTEST_BENCHMARK_FORMAT = "5.1.0"  # the `version` written when pytest-benchmark is absent


# ---- statistics ----------------------------------------------------------------------------

def stats_from_samples(samples: Sequence[float]) -> Dict[str, Any]:
    """pytest-benchmark's `stats` block for per-round durations (one iteration per round)."""
    if not samples:
        raise ValueError("no samples")
    try:
        from pytest_benchmark.stats import Stats
    except ImportError:
        return _plain_stats(samples)
    s = Stats()
    for x in samples:
        s.update(float(x))
    out = s.as_dict()
    out["iterations"] = 1
    return out


def _plain_stats(samples: Sequence[float]) -> Dict[str, Any]:
    """The same keys without pytest-benchmark (quartiles by the inclusive method)."""
    data = [float(x) for x in samples]
    n = len(data)
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive") if n > 1 else (data[0],) * 3
    mean = statistics.mean(data)
    sd = statistics.stdev(data) if n > 1 else 0.0
    return {"min": min(data), "max": max(data), "mean": mean, "stddev": sd, "rounds": n,
            "median": statistics.median(data), "iqr": q3 - q1, "q1": q1, "q3": q3,
            "iqr_outliers": sum(1 for x in data if x < q1 - 1.5 * (q3 - q1) or x > q3 + 1.5 * (q3 - q1)),
            "stddev_outliers": sum(1 for x in data if abs(x - mean) > sd),
            "outliers": "", "ld15iqr": min(data), "hd15iqr": max(data),
            "ops": n / sum(data) if sum(data) else 0, "total": sum(data), "iterations": 1}


# ---- entries and ratios --------------------------------------------------------------------

def benchmark_entry(record: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement record (see `measure.measure`) as a pytest-benchmark entry."""
    spec = record["spec"]
    component, side, mode = spec["component"], spec["side"], spec["mode"]
    stats = stats_from_samples(record["samples_s"])
    flops = record.get("flops")
    compile_s = record.get("compile_s")
    extra = {
        "component": component, "side": side, "mode": mode,
        "preset": spec["preset"], "height": spec["height"], "width": spec["width"],
        "dtype": spec["dtype"], "steps": spec["steps"] if component == "pipeline" else None,
        "device": record.get("device"), "framework": record.get("framework"),
        "threads": record.get("threads"),
        "weights": record.get("weights"), "materialised": record.get("materialised"),
        "peak_rss_bytes": record.get("peak_rss_bytes"),
        "baseline_rss_bytes": record.get("baseline_rss_bytes"),
        "loaded_rss_bytes": record.get("loaded_rss_bytes"),
        "device_peak_bytes": record.get("device_peak_bytes"),
        "flops": flops,
        "flops_per_s": (flops / stats["median"]) if flops and stats["median"] > 0 else None,
        "first_call_s": record.get("first_call_s"),
        "compile_s": compile_s,
        "load_s": record.get("load_s"),
        "warmup_s": record.get("warmup_s"),
        "pass_medians_s": record.get("pass_medians_s"),
    }
    if record.get("gpu"):
        extra["gpu"] = record["gpu"]
    return {
        "group": component,
        "name": f"{component}[{side}-{mode}]",
        "fullname": f"benchmarks/test_components.py::test_component[{component}-{side}-{mode}]",
        "params": {"component": component, "side": side, "mode": mode},
        "param": f"{component}-{side}-{mode}",
        "extra_info": extra,
        "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": stats["rounds"],
                    "max_time": None, "min_time": None, "warmup": spec.get("warmup", 0)},
        "stats": stats,
    }


def entry_key(entry: Dict[str, Any]):
    """(component, side, mode) of an entry, from `extra_info` (or its name as a fallback)."""
    info = entry.get("extra_info") or {}
    if {"component", "side", "mode"} <= set(info):
        return info["component"], info["side"], info["mode"]
    return entry.get("name"), "", ""


def compute_ratios(benchmarks: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per component and port mode: port median / reference median (> 1: the port is slower).
    A component without both sides gets no ratio."""
    port, ref = {}, {}
    for e in benchmarks:
        component, side, mode = entry_key(e)
        if side == "port":
            port[(component, mode)] = e
        elif side == "reference":
            ref.setdefault(component, e)  # one reference mode (eager) today
    out = []
    for (component, mode), p in sorted(port.items(), key=lambda kv: _order(kv[0][0])):
        r = ref.get(component)
        if r is None:
            continue
        pm, rm = p["stats"]["median"], r["stats"]["median"]
        out.append({"component": component, "port_mode": mode,
                    "reference_mode": entry_key(r)[2], "port_median_s": pm,
                    "reference_median_s": rm, "ratio": pm / rm if rm > 0 else None})
    return out


def _order(component: str) -> int:
    return COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)


# ---- environment ---------------------------------------------------------------------------

def machine_info() -> Dict[str, Any]:
    try:
        from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info

        info = pytest_benchmark_generate_machine_info()
    except Exception:  # pytest-benchmark (or py-cpuinfo) absent: the platform part only
        info = {"node": platform.node(), "processor": platform.processor(),
                "machine": platform.machine(), "python_version": platform.python_version(),
                "python_implementation": platform.python_implementation(),
                "release": platform.release(), "system": platform.system(),
                "cpu": {"count": os.cpu_count()}}
    try:
        import psutil

        info["memory_total_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    info["libraries"] = _library_versions()
    return info


def _library_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for name in ("mindspore", "torch", "diffusers", "transformers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def commit_info(where: Optional[Path] = None) -> Dict[str, Any]:
    """pytest-benchmark's commit block for the checkout holding this package."""
    where = Path(where or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        return {"id": commit, "time": git("show", "-s", "--pretty=format:%cI"),
                "author_time": git("show", "-s", "--pretty=format:%aI"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "project": Path(git("rev-parse", "--show-toplevel")).name,
                "branch": "(detached head)" if branch == "HEAD" else branch}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"id": "unversioned", "time": None, "author_time": None, "dirty": False,
                "project": "sdxl-parity", "branch": "(unknown)", "error": repr(exc)}


def _pytest_benchmark_version() -> str:
    try:
        from importlib import metadata

        return metadata.version("pytest-benchmark")
    except Exception:
        return PYTEST_BENCHMARK_FORMAT


def build_results(records: Sequence[Dict[str, Any]], run: Dict[str, Any],
                  failures: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    benchmarks = [benchmark_entry(r) for r in records]
    return {
        "machine_info": machine_info(),
        "commit_info": commit_info(),
        "benchmarks": benchmarks,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": _pytest_benchmark_version(),
        "ratios": compute_ratios(benchmarks),
        "run": dict(run),
        "failures": list(failures),
    }


# ---- markdown ------------------------------------------------------------------------------

def fmt_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}" if unit == "GiB" else f"{b / scale:.0f} {unit}"
    return f"{b} B"


def fmt_gflops(f: Optional[float]) -> str:
    if not f:
        return "-"
    g = f / 1e9
    return f"{g:.3g}" if g < 1000 else f"{g:,.0f}"


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render_markdown(results: Dict[str, Any]) -> str:
    run = results.get("run", {})
    by_key = {entry_key(e): e for e in results.get("benchmarks", [])}
    ref_by_component = {k[0]: e for k, e in by_key.items() if k[1] == "reference"}
    lines = [f"# sdxl-bench: port vs reference ({run.get('preset', '?')}, "
             f"{run.get('height', '?')}x{run.get('width', '?')}, {run.get('dtype', '?')})", ""]
    lines += ["ratio = port median / reference median, both measured in this run "
              "(> 1: the port is slower).", ""]
    lines += ["| component | port median | reference median | ratio | port peak RSS "
              "| ref peak RSS | GFLOP/s (port / ref) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    shown = set()
    for r in results.get("ratios", []):
        p = by_key.get((r["component"], "port", r["port_mode"]))
        ref = ref_by_component.get(r["component"])
        shown.update({entry_key(p), entry_key(ref)})
        label = r["component"] if len(_port_modes(results)) < 2 else f"{r['component']} ({r['port_mode']})"
        lines.append("| " + " | ".join([
            label, fmt_seconds(r["port_median_s"]), fmt_seconds(r["reference_median_s"]),
            f"**{fmt_ratio(r['ratio'])}**", fmt_bytes(p["extra_info"].get("peak_rss_bytes")),
            fmt_bytes(ref["extra_info"].get("peak_rss_bytes")),
            f"{fmt_gflops(p['extra_info'].get('flops_per_s'))} / "
            f"{fmt_gflops(ref['extra_info'].get('flops_per_s'))}"]) + " |")
    for key, e in by_key.items():  # entries without a counterpart (one side failed)
        if key in shown:
            continue
        info = e["extra_info"]
        port, ref = (e, None) if key[1] == "port" else (None, e)
        lines.append("| " + " | ".join([
            f"{key[0]} ({key[1]} only)",
            fmt_seconds(port["stats"]["median"]) if port else "-",
            fmt_seconds(ref["stats"]["median"]) if ref else "-", "-",
            fmt_bytes(info.get("peak_rss_bytes")) if port else "-",
            fmt_bytes(info.get("peak_rss_bytes")) if ref else "-",
            fmt_gflops(info.get("flops_per_s"))]) + " |")

    lines += ["", "<details><summary>every measurement</summary>", "",
              "| component | side | mode | device | rounds | min | median | max | first call "
              "| compile | load | baseline RSS | peak RSS | device peak | GFLOP |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (component, side, mode), e in sorted(by_key.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1:])):
        s, i = e["stats"], e["extra_info"]
        lines.append("| " + " | ".join([
            component, side, mode, str(i.get("device") or "-"), str(s["rounds"]),
            fmt_seconds(s["min"]), fmt_seconds(s["median"]), fmt_seconds(s["max"]),
            fmt_seconds(i.get("first_call_s")), fmt_seconds(i.get("compile_s")),
            fmt_seconds(i.get("load_s")), fmt_bytes(i.get("baseline_rss_bytes")),
            fmt_bytes(i.get("peak_rss_bytes")), fmt_bytes(i.get("device_peak_bytes")),
            fmt_gflops(i.get("flops"))]) + " |")
    lines += ["", "</details>", ""]

    notes = [f"- weights: {run['weights']}" if run.get("weights") else None,
             f"- rounds {run.get('rounds')}, warm-up {run.get('warmup')}, pipeline steps "
             f"{run.get('steps')}, threads {run.get('threads') or 'framework default'}; "
             "each measurement in a fresh process (peak RSS = that process's high-water mark, "
             "framework imports included; baseline RSS = after the imports, before the model)",
             "- FLOPs: analytic (benchmarks/flops.py), 2 per multiply-accumulate of matmuls, "
             "convolutions and attention; GFLOP/s = FLOPs / median",
             "- device peak: the framework allocator's peak on an accelerator; - on CPU"]
    if (run.get("repeats") or 1) > 1:
        per_pass = "; ".join(
            f"{c} {side} ({mode}) " + " / ".join(fmt_seconds(m) for m in e["extra_info"]["pass_medians_s"])
            for (c, side, mode), e in by_key.items() if e["extra_info"].get("pass_medians_s"))
        notes.append(f"- {run['repeats']} interleaved passes over all measurements, samples "
                     f"pooled; each pass's median: {per_pass}")
    machine = results.get("machine_info", {})
    cpu = machine.get("cpu", {})
    load = run.get("load_average")
    if load and None not in load:
        notes.append(f"- 1-minute load average {load[0]} at the start, {load[1]} at the end, on "
                     f"{cpu.get('count', '?')} CPUs (above the CPU count, other processes "
                     "competed for them)")
    commit = results.get("commit_info", {})
    notes.append(f"- machine: {cpu.get('brand_raw') or machine.get('processor') or '?'}, "
                 f"{cpu.get('count') or os.cpu_count()} CPUs; commit "
                 f"{str(commit.get('id', '?'))[:12]}{' (dirty)' if commit.get('dirty') else ''}")
    for f in results.get("failures", []):
        notes.append(f"- FAILED {f.get('component')} {f.get('side')} ({f.get('mode')}): "
                     f"{f.get('error')}")
    lines += [n for n in notes if n] + [""]
    return "\n".join(lines)


def _port_modes(results: Dict[str, Any]) -> List[str]:
    return sorted({r["port_mode"] for r in results.get("ratios", [])})


# ---- writing -------------------------------------------------------------------------------

def write_outputs(results: Dict[str, Any], out: Path) -> Dict[str, Path]:
    """results.json, results.md and ratios.png under `out`, each written atomically."""
    from sdxl_common.atomic import atomic_write_bytes, atomic_write_text

    from .charts import ratio_chart_png

    out = Path(out)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "ratios.png"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths["md"], render_markdown(results))
    title = (f"port / reference median ({results.get('run', {}).get('preset', '')}, "
             f"lower is better for the port)")
    atomic_write_bytes(paths["png"], ratio_chart_png(results.get("ratios", []), title=title))
    return paths
