"""`sdxl-parity`: the parity harness's command line.

Exit codes: 0 pass, 1 parity failure, 2 bad input or usage (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sdxl_ms.config import PRESETS


def cmd_make_checkpoint(args) -> int:
    from sdxl_ms.config import get_preset
    from sdxl_ms.weights.synthetic import make_checkpoint

    out = make_checkpoint(get_preset(args.preset), args.seed, Path(args.out), args.format,
                          args.dtype, overwrite=args.force)
    print(f"wrote {args.format} checkpoint ({args.preset}, seed {args.seed}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sdxl_ms.weights.checkpoint import FORMATS
    from sdxl_ms.weights.synthetic import DTYPES

    p = argparse.ArgumentParser(prog="sdxl-parity",
                                description="Stage-by-stage parity of the MindSpore SDXL port "
                                            "against diffusers")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-checkpoint", help="write seeded random weights in a real layout")
    m.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="folder (diffusers) or .safetensors file (sgm)")
    m.add_argument("--format", choices=FORMATS, default="diffusers")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--force", action="store_true", help="replace an existing output")
    m.set_defaults(func=cmd_make_checkpoint)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from sdxl_ms.weights.safetensors_io import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileExistsError, ValueError, OSError) as e:
        print(f"sdxl-parity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
