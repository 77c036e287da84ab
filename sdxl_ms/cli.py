"""`sdxl-ms`: the port's command line (keys, inspect, generate).

Bad input ends with one line on stderr naming the problem and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .config import PRESETS


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit code 2."""


def format_layout(layout) -> str:
    return "".join(f"{name}:{tuple(shape)}\n" for name, shape in layout.items())


def cmd_keys(args) -> int:
    from .config import get_preset
    from .weights.loader import expected_layout

    sys.stdout.write(format_layout(expected_layout(get_preset(args.preset), args.format)))
    return 0


def cmd_inspect(args) -> int:
    from .weights.checkpoint import open_checkpoint
    from .weights.loader import diff_layout, expected_layout

    ckpt = open_checkpoint(Path(args.path))
    n = sum(_numel(s) for s in ckpt.shapes.values())
    print(f"path: {ckpt.path}")
    print(f"format: {ckpt.format}")
    print(f"tensors: {len(ckpt.shapes)} ({n / 1e6:.2f}M values)")
    best = None
    for name, cfg in PRESETS.items():
        d = diff_layout(expected_layout(cfg, ckpt.format), ckpt.shapes)
        if best is None or d.size < best[1].size:
            best = (name, d)
    name, d = best
    if d.ok:
        print(f"preset: {name} (layout matches exactly)")
        return 0
    print(f"preset: none; closest is {name}: {d.describe(limit=20)}")
    return 1


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_parser() -> argparse.ArgumentParser:
    from .weights.checkpoint import FORMATS

    p = argparse.ArgumentParser(prog="sdxl-ms", description="MindSpore SDXL port")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("keys", help="print the checkpoint layout the port expects")
    k.add_argument("--preset", choices=sorted(PRESETS), default="sdxl-base")
    k.add_argument("--format", choices=FORMATS, default="sgm")
    k.set_defaults(func=cmd_keys)

    i = sub.add_parser("inspect", help="say which format a checkpoint is and how it differs "
                                       "from the expected layout (exit 1 when it matches no preset)")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    from .generate_cli import add_generate_parser
    add_generate_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .weights.safetensors_io import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, CheckpointError, FileExistsError, ValueError, OSError) as e:
        print(f"sdxl-ms: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
