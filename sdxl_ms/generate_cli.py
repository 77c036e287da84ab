"""`sdxl-ms generate`: text to PNG.

Every argument is checked before the model loads; a bad one ends with one line and exit code 2
and no file. PNGs carry prompt, seed, sampler, schedule, steps and guidance as text chunks and
nothing time-dependent, so the same arguments give byte-identical files.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import List

from sdxl_common.errors import InputError

DEFAULT_PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def add_generate_parser(sub, parents=()) -> None:
    from sdxl_common.dtypes import DTYPES

    from .sampling import SAMPLERS
    from .sampling.discretization import SCHEDULES

    g = sub.add_parser("generate", parents=list(parents),
                       help="generate PNG images from a prompt")
    g.add_argument("--checkpoint", help="diffusers folder or sgm .safetensors file "
                                        "(default: a cached seeded tiny checkpoint)")
    g.add_argument("--prompt", default=None, help=f"default: {DEFAULT_PROMPT!r}")
    g.add_argument("--prompt-file", default=None,
                   help="UTF-8 text file, one prompt per line (blank lines skipped)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLERS)}")
    g.add_argument("--schedule", default="leading", help=f"one of {', '.join(SCHEDULES)}")
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None, help="default: the preset's native size")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--out", default="sdxl.png", help="a .png file, or a folder for several images")
    g.set_defaults(func=cmd_generate)


def output_paths(out: str, count: int, seed: int) -> List[Path]:
    out_path = Path(out)
    if out_path.suffix.lower() == ".png":
        if count == 1:
            return [out_path]
        return [out_path.with_name(f"{out_path.stem}-{i}.png") for i in range(count)]
    return [out_path / f"sdxl-seed{seed}-{i}.png" for i in range(count)]


def validate(args) -> List[str]:
    """Check every argument before anything loads; returns the prompts to generate."""
    from .pipeline import check_generation_args, check_guidance
    from .sampling import check_sampler
    from sdxl_common.validate import check_existing, check_writable_file, read_prompt_file

    check_sampler(args.sampler, args.schedule)
    if args.num_images < 1:
        raise InputError(f"--num-images must be >= 1, got {args.num_images}")
    check_generation_args(args.height or 8, args.width or 8, args.steps, "np")
    check_guidance(args.guidance)
    if args.prompt is not None and args.prompt_file is not None:
        raise InputError("give --prompt or --prompt-file, not both")
    prompts = (read_prompt_file(args.prompt_file) if args.prompt_file
               else [args.prompt or DEFAULT_PROMPT])
    if args.checkpoint is not None:
        check_existing(args.checkpoint, "checkpoint")
    for path in output_paths(args.out, args.num_images * len(prompts), args.seed):
        check_writable_file(path, "image")
    return prompts


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
    from sdxl_common.atomic import atomic_write_bytes
    from sdxl_common.images import to_uint8

    from .pipeline import load_pipeline
    from .weights.synthetic import cached_checkpoint

    prompts = [p for p in validate(args) for _ in range(args.num_images)]
    checkpoint = args.checkpoint or cached_checkpoint("tiny", seed=0)
    pipe = load_pipeline(checkpoint, dtype=args.dtype)
    images = pipe(prompts, args.negative_prompt, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, schedule=args.schedule, seed=args.seed)
    text = {"negative_prompt": args.negative_prompt or "", "seed": args.seed,
            "sampler": args.sampler, "schedule": args.schedule, "steps": args.steps,
            "guidance": args.guidance, "dtype": args.dtype,
            "checkpoint": Path(checkpoint).name, "generator": "sdxl-ms"}
    paths = output_paths(args.out, len(prompts), args.seed)
    for i, (path, prompt, image) in enumerate(zip(paths, prompts, to_uint8(images))):
        atomic_write_bytes(path, png_bytes(image, {"prompt": prompt, **text, "index": i}))
        print(f"wrote {path}")
    return 0
