"""`sdxl-ms`: the port's command line (keys, inspect, generate).

Exit codes as in `sdxl_common.errors`: bad input ends with one line on stderr naming the problem
and exit code 2, an internal error with exit code 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sdxl_common.cli import (ArgumentParser, add_global_options, add_version, common_options,
                         run_command)
from .config import PRESETS

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

    from sdxl_common.errors import InputError
    from .weights.loader import infer_preset

    ckpt = open_checkpoint(Path(args.path))
    n = sum(_numel(s) for s in ckpt.shapes.values())
    print(f"path: {ckpt.path}")
    print(f"format: {ckpt.format}")
    print(f"tensors: {len(ckpt.shapes)} ({n / 1e6:.2f}M values)")
    try:
        cfg = infer_preset(ckpt)
    except InputError:
        cfg = None
    if cfg is not None and cfg.name not in PRESETS:
        u = cfg.unet
        print(f"preset: none; the layout matches the folder's own config.json files (UNet "
              f"model_channels {u.model_channels}, channel_mult {list(u.channel_mult)}, "
              f"transformer_depth {list(u.transformer_depth)})")
        return 0
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

    p = ArgumentParser(prog="sdxl-ms", description="MindSpore SDXL port",
                       epilog="exit codes: 0 done, 2 bad input, 3 internal error, 130 interrupted "
                              "(inspect: 1 when the checkpoint matches no preset)")
    add_version(p)
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    common = common_options(quiet=False)

    k = sub.add_parser("keys", parents=[common], help="print the checkpoint layout the port expects")
    k.add_argument("--preset", choices=sorted(PRESETS), default="sdxl-base")
    k.add_argument("--format", choices=FORMATS, default="sgm")
    k.set_defaults(func=cmd_keys)

    i = sub.add_parser("inspect", parents=[common], help="say which format a checkpoint is and how it differs "
                                       "from the expected layout (exit 1 when it matches no preset)")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    from .generate_cli import add_generate_parser
    add_generate_parser(sub, [common_options()])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("sdxl-ms", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
