"""Per-module floors of the faithful port at two presets, side by side: the measurement behind the
`small` preset's claim that its modules round as sdxl-base's do.

For each preset, dtype and seed it records the reference with module captures and module truths
(each module's float64 twin: no float64 pipeline, so sdxl-base fits in 24 GiB), runs `locate`
on the built-in port and keeps, per module kind, the largest own rel L2 and truth ratio
(`parity.module_floors`). Cases are cached in --out, so an interrupted run resumes.

    python tools/module_floor_table.py --presets small,sdxl-base --size 256 \\
        --dtypes float32,float16 --seeds 0 --out /tmp/module-floors
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def case_floors(preset: str, dtype: str, seed: int, size: int, out: Path, steps: int = 2) -> dict:
    from parity.module_floors import module_floors
    from parity.policy import load_policy
    from parity.recording import RunSpec, resolve_checkpoint
    from parity.reference_process import peak_rss_bytes, record_isolated
    from sdxl_ms import load_pipeline

    done = out / f"{preset}-{dtype}-seed{seed}-{size}px.json"
    if done.exists():
        return json.loads(done.read_text())
    spec = RunSpec(preset=preset, dtype=dtype, samplers=("euler",), steps=steps, seed=seed,
                   height=size, width=size)
    ckpt = resolve_checkpoint(spec)
    folder = out / f"rec-{preset}-{dtype}-seed{seed}-{size}px"
    start = time.perf_counter()
    if (folder / "manifest.json").exists():  # recorded by an interrupted run
        from parity.recording import Recording

        rec, stats = Recording.load(folder), {"peak_rss_bytes": 0}
    else:
        rec, stats = record_isolated(spec, ckpt, folder, modules=True, module_truth=True)
    recorded = time.perf_counter() - start
    port = load_pipeline(ckpt, dtype)
    floors = module_floors(rec, port, load_policy(), log=lambda s: print("   ", s, flush=True))
    result = {"preset": preset, "dtype": dtype, "seed": seed, "size": size, "floors": floors,
              "record_seconds": round(recorded, 1),
              "locate_seconds": round(time.perf_counter() - start - recorded, 1),
              "record_peak_rss_gib": round(stats["peak_rss_bytes"] / 2 ** 30, 2),
              "peak_rss_gib": round(peak_rss_bytes() / 2 ** 30, 2)}
    done.write_text(json.dumps(result, indent=1))
    return result


def table(results, presets, dtypes) -> str:
    from parity.module_floors import merge_floors

    merged = {}
    for r in results:
        merge_floors(merged.setdefault((r["preset"], r["dtype"]), {}), r["floors"])
    a, b = (presets * 2)[:2]
    lines = []
    for dtype in dtypes:
        fa, fb = merged.get((a, dtype), {}), merged.get((b, dtype), {})
        lines += [f"\n### {dtype}\n",
                  f"| kind | own rel L2 {a} | own rel L2 {b} | {a}/{b} | truth ratio {a} "
                  f"| truth ratio {b} | {a}/{b} |", "|---|---:|---:|---:|---:|---:|---:|"]
        for kind in sorted(set(fa) | set(fb)):
            cells = [kind]
            for key in ("own_rel_l2", "truth_ratio"):
                va, vb = fa.get(kind, {}).get(key), fb.get(kind, {}).get(key)
                cells += [_fmt(va), _fmt(vb),
                          f"{va / vb:.2f}" if va is not None and vb else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,sdxl-base")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=2,
                        help="sampler steps (the module capture is of UNet call 0 either way)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets, dtypes = args.presets.split(","), args.dtypes.split(",")
    results = []
    for preset in presets:
        for dtype in dtypes:
            for seed in (int(s) for s in args.seeds.split(",")):
                print(f"{preset} {dtype} seed {seed}", flush=True)
                r = case_floors(preset, dtype, seed, args.size, out, args.steps)
                print(f"  recorded in {r['record_seconds']} s (peak RSS "
                      f"{r['record_peak_rss_gib']} GiB), located in {r['locate_seconds']} s",
                      flush=True)
                results.append(r)
    text = table(results, presets, dtypes)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
