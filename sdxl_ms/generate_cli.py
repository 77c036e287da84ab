"""`sdxl-ms generate`: text to PNG.

Every argument is checked before the model loads; a bad one ends with one line and exit code 2
and no file. PNGs carry prompt, seed, sampler, schedule, steps and guidance as text chunks and
nothing time-dependent, so the same arguments give byte-identical files.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import List

DEFAULT_PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def add_generate_parser(sub) -> None:
    from .sampling import SAMPLERS
    from .sampling.discretization import SCHEDULES

    g = sub.add_parser("generate", help="generate PNG images from a prompt")
    g.add_argument("--checkpoint", help="diffusers folder or sgm .safetensors file "
                                        "(default: a cached seeded tiny checkpoint)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLERS)}")
    g.add_argument("--schedule", default="leading", help=f"one of {', '.join(SCHEDULES)}")
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None, help="default: the preset's native size")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--out", default="sdxl.png", help="a .png file, or a folder for several images")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)


def output_paths(out: str, count: int, seed: int) -> List[Path]:
    out_path = Path(out)
    if out_path.suffix.lower() == ".png":
        if count == 1:
            return [out_path]
        return [out_path.with_name(f"{out_path.stem}-{i}.png") for i in range(count)]
    return [out_path / f"sdxl-seed{seed}-{i}.png" for i in range(count)]


def _check_writable(paths: List[Path]) -> None:
    for p in paths:
        parent = p.parent
        while not parent.exists():  # folders we would create
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise PermissionError(f"cannot write {p}: {parent} is not a writable folder")
        if p.is_dir():
            raise IsADirectoryError(f"cannot write {p}: it is a folder")


def validate(args) -> None:
    from .pipeline import check_generation_args
    from .sampling import SAMPLERS
    from .sampling.discretization import SCHEDULES

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {args.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None:
            check_generation_args(value, value, 1, "np")
    check_generation_args(8, 8, args.steps, "np")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    _check_writable(output_paths(args.out, args.num_images, args.seed))


def png_bytes(image, text: dict) -> bytes:
    """PNG of one uint8 (H,W,3) image with tEXt chunks, deterministic for equal inputs."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def cmd_generate(args) -> int:
    from .pipeline import load_pipeline, to_uint8
    from .weights.safetensors_io import atomic_path
    from .weights.synthetic import cached_checkpoint

    validate(args)
    checkpoint = args.checkpoint or cached_checkpoint("tiny", seed=0)
    pipe = load_pipeline(checkpoint, dtype=args.dtype)
    images = pipe([args.prompt] * args.num_images, args.negative_prompt, height=args.height,
                  width=args.width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, sampler=args.sampler, schedule=args.schedule,
                  seed=args.seed, progress=not args.quiet)
    text = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
            "seed": args.seed, "sampler": args.sampler, "schedule": args.schedule,
            "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype,
            "checkpoint": Path(checkpoint).name, "generator": "sdxl-ms"}
    for i, (path, image) in enumerate(zip(output_paths(args.out, args.num_images, args.seed),
                                          to_uint8(images))):
        data = png_bytes(image, {**text, "index": i})
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        print(f"wrote {path}")
    return 0
