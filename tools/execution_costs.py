"""Write `sdxl_ms/assets/execution-costs.json` (the costs the harness picks the port's
execution mode by) from `sdxl-bench` results, by default the committed baselines.

    python tools/execution_costs.py [benchmarks/baselines/*/results.json ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINES = sorted((REPO / "benchmarks" / "baselines").glob("*/results.json"))


def derive(paths) -> dict:
    from sdxl_ms.execution_costs import costs_from_bench

    docs = [json.loads(Path(p).read_text()) for p in paths]
    sources = [str(Path(p).resolve().relative_to(REPO)) if Path(p).resolve().is_relative_to(REPO)
               else str(p) for p in paths]
    return {"source": f"python tools/execution_costs.py {' '.join(sources)}",
            "hosts": sorted({d["machine_info"]["cpu"]["brand_raw"] for d in docs}),
            "costs": costs_from_bench(docs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", default=BASELINES)
    parser.add_argument("--out", default=None, help="default: the package's costs file")
    args = parser.parse_args()
    from sdxl_common.atomic import atomic_write_text
    from sdxl_ms.execution_costs import COSTS_FILE

    out = Path(args.out) if args.out else COSTS_FILE
    atomic_write_text(out, json.dumps(derive(args.results), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
