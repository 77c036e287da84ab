"""Where a component's time goes, per op kind, on both sides: the port under MindSpore's own
profiler, the reference under torch's, one call each after warm-up, each side in a process of
its own (the benchmark's workloads: same inputs, same weights).

Op kinds: matmul (dense layers), attention (the score and value products and the softmax),
conv, norm (GroupNorm, LayerNorm), elementwise (everything else a kernel does: bias adds,
activations, casts, copies, concatenations) and dispatch (the call's wall time outside every
kernel: Python, the framework's per-op launch). Achieved FLOP/s divides each kind's analytic
FLOPs (`benchmarks.flops.flops_by_kind`, the same math on both sides) by each side's kernel
time of that kind.

    python -m benchmarks.op_profile --preset sdxl-base --size 256 --components text,unet,vae \\
        --out profile-out
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from .workloads import Spec, build

KINDS = ("matmul", "attention", "conv", "norm", "elementwise", "dispatch")
_PORT_KINDS = {"MatMul": "matmul", "MatMulExt": "matmul", "Dense": "matmul",
               "BatchMatMul": "attention", "BatchMatMulExt": "attention", "Softmax": "attention",
               "Conv2D": "conv", "Conv2DExt": "conv",
               "GroupNorm": "norm", "LayerNorm": "norm", "LayerNormExt": "norm"}
_TORCH_KINDS = {"aten::addmm": "matmul", "aten::mm": "matmul",
                "aten::bmm": "attention", "aten::baddbmm": "attention",
                "aten::scaled_dot_product_attention": "attention",
                "aten::_softmax": "attention",
                "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
                "aten::mkldnn_convolution": "conv", "aten::_convolution": "conv",
                "aten::convolution": "conv", "aten::conv2d": "conv",
                "aten::_slow_conv2d_forward": "conv",
                "aten::native_group_norm": "norm", "aten::native_layer_norm": "norm"}


def _port_kernels(call) -> Dict[str, float]:
    """Seconds of kernel time per MindSpore op type in one call (its CPU profiler)."""
    import csv

    import mindspore as ms
    from mindspore.profiler import ProfilerActivity, ProfilerLevel

    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        prof = ms.Profiler(output_path=tmp, activities=[ProfilerActivity.CPU],
                           profiler_level=ProfilerLevel.Level1)
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
        prof.stop()
        prof.analyse()
        found = list(Path(tmp).rglob("cpu_op_type_info_*.csv"))
        if not found:
            raise RuntimeError("MindSpore's profiler wrote no cpu_op_type_info table")
        with open(found[0]) as fh:
            ops = {row["op_type"]: float(row["total_compute_time"]) / 1e3
                   for row in csv.DictReader(fh)}
    return {"wall_s": wall, "ops": ops}


def _reference_kernels(call) -> Dict[str, float]:
    """Seconds of self time per aten op in one call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "ops": {e.key: e.self_cpu_time_total / 1e6
                                    for e in prof.key_averages()}}


def profile_side(spec: Spec, warmup: int = 2) -> Dict:
    """One call of `spec`'s workload profiled after `warmup` calls."""
    workload = build(spec)
    for _ in range(warmup):
        workload.call()
    side = _port_kernels if spec.side == "port" else _reference_kernels
    return side(workload.call)


def by_kind(side: str, raw: Dict) -> Dict[str, float]:
    """Seconds per op kind; `dispatch` is the call's wall time outside every kernel. On the
    reference, a kernel's self time includes its own framework overhead."""
    table = _PORT_KINDS if side == "port" else _TORCH_KINDS
    out = defaultdict(float)
    for op, seconds in raw["ops"].items():
        if side == "reference" and not op.startswith("aten::"):
            continue
        out[table.get(op, "elementwise")] += seconds
    out["dispatch"] = max(raw["wall_s"] - sum(out.values()), 0.0)
    return dict(out)


def table(component: str, port: Dict, reference: Dict, flops: Dict[str, int]) -> str:
    """Markdown: per kind each side's time, share of its call and achieved GFLOP/s."""
    p, r, f = by_kind("port", port), by_kind("reference", reference), flops
    pw, rw = port["wall_s"], reference["wall_s"]
    lines = [f"**{component}**: port {pw:.3g} s, reference {rw:.3g} s per call "
             f"({pw / rw:.2f}x)", "",
             "| op kind | port s | port share | reference s | reference share | port / ref "
             "| GFLOP/s port / ref |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        ps, rs = p.get(kind, 0.0), r.get(kind, 0.0)
        gf = (f"{f[kind] / ps / 1e9:.1f} / {f[kind] / rs / 1e9:.1f}"
              if f.get(kind) and ps and rs else "-")
        ratio = f"{ps / rs:.2f}x" if rs else "-"
        lines.append(f"| {kind} | {ps:.3g} | {ps / pw:.0%} | {rs:.3g} | {rs / rw:.0%} "
                     f"| {ratio} | {gf} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=None, help="image side (default: preset's)")
    parser.add_argument("--components", default="text,unet,vae")
    parser.add_argument("--port-mode", default="pynative",
                        help="the port's mode: pynative, graph or graph-blocks")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=None, help="folder for profile.md/.json")
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spec:  # the child (runner.run_spec_in_subprocess): one side of one component
        from .measure import run_child

        return run_child(args.spec, args.result, profile_side)

    from sdxl_ms.config import get_preset

    from .flops import flops_by_kind
    from .runner import default_checkpoint, run_spec_in_subprocess

    size = args.size or get_preset(args.preset).default_size
    checkpoint = default_checkpoint(args.preset, 0)
    sections, raw = [], {}
    for component in args.components.split(","):
        runs = {}
        for side, mode in (("port", args.port_mode), ("reference", "eager")):
            spec = Spec(component, side, mode, preset=args.preset, height=size, width=size,
                        dtype=args.dtype, checkpoint=checkpoint)
            print(f"[op_profile] {component} {side} ({mode}) ...", file=sys.stderr, flush=True)
            runs[side] = run_spec_in_subprocess("benchmarks.op_profile", spec)
        raw[component] = runs
        flops = flops_by_kind(get_preset(args.preset), component, size, size)
        sections.append(table(component, runs["port"], runs["reference"], flops))
    text = (f"# Op-kind profile: {args.preset} {size}x{size} {args.dtype}, port "
            f"{args.port_mode}\n\n" + "\n\n".join(sections) + "\n")
    print(text)
    if args.out:
        from sdxl_common.atomic import atomic_write_text

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "profile.md", text)
        atomic_write_text(args.out / "profile.json", json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
