"""Seeded random checkpoints in both real formats, written offline and without torch.

The weights are drawn in the sgm namespace (`random_init`), so the `sgm` file and the
`diffusers` folder made from the same seed hold the same numbers. Everything is streamed one
tensor at a time and appears only when complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from sdxl_common.atomic import atomic_dir
from ..config import SDXLConfig, get_preset
from sdxl_common.errors import InputError
from sdxl_common.validate import check_choice, check_output_dir, check_writable_file
from .checkpoint import DIFFUSERS, FORMATS, MINDSPORE, SGM, SGM_NAMED, variant_file
from .diffusers_configs import model_index, pipeline_configs
from .keymap import COMPONENT_FILES, KeyRule, pipeline_rules, split_component, to_diffusers
from .loader import expected_layout
from sdxl_common.paths import cache_dir
from .random_init import random_tensor
from .safetensors_io import write_safetensors

DTYPES = {"float32": np.float32, "float16": np.float16}
# bump when what a seed produces changes (init scales, configs), so stale caches are not reused
GENERATOR_VERSION = 2


def make_checkpoint(cfg: SDXLConfig, seed: int, out: Path, fmt: str = DIFFUSERS,
                    dtype: str = "float32", overwrite: bool = False,
                    variant: Optional[str] = None) -> Path:
    """Seeded random weights in a real layout. `variant="fp16"` (diffusers only) writes
    float16 weights under diffusers' variant names (`*.fp16.safetensors`)."""
    check_choice(fmt, FORMATS, "checkpoint format")
    check_choice(dtype, tuple(DTYPES), "dtype")
    if variant is not None:
        check_choice(variant, ("fp16",), "variant")
        if fmt != DIFFUSERS:
            raise InputError("--variant applies to the diffusers format only")
        dtype = "float16"
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists (pass --force to replace it)")
    if fmt in SGM_NAMED:
        check_writable_file(out)
    else:
        check_output_dir(out, "checkpoint folder")
    meta = {"generator": "sdxl-parity make-checkpoint", "generator_version": str(GENERATOR_VERSION),
            "preset": cfg.name, "seed": str(seed), "format": fmt}
    shapes = expected_layout(cfg, SGM)

    def get(name: str) -> np.ndarray:
        return random_tensor(seed, name, shapes[name])

    if fmt == SGM:
        write_safetensors(out, list(shapes.items()), get, DTYPES[dtype], meta)
    elif fmt == MINDSPORE:
        from sdxl_common.atomic import atomic_open
        from .mindspore_ckpt import write_ckpt

        with atomic_open(out, "wb") as f:
            write_ckpt(f, ((n, get(n).astype(DTYPES[dtype]).reshape(shapes[n])) for n in shapes))
    else:
        write_diffusers_folder(cfg, get, out, DTYPES[dtype], meta, variant)
    return out


def write_diffusers_folder(cfg: SDXLConfig, get_sgm: Callable[[str], np.ndarray], out: Path,
                           dtype, meta: Dict[str, str], variant: Optional[str] = None) -> None:
    """A complete diffusers pipeline folder (configs, tokenizers, weights) whose tensors are
    made from sgm tensors read through `get_sgm`; it appears at `out` only when complete."""
    with atomic_dir(out, replace=True) as tmp:
        _write_configs(cfg, tmp)
        diff_shapes = expected_layout(cfg, DIFFUSERS)
        producer = _DiffusersProducer(pipeline_rules(cfg), get_sgm)
        for component, filename in COMPONENT_FILES.items():
            layout = [(k.partition("/")[2], s) for k, s in diff_shapes.items()
                      if split_component(k)[0] == component]
            write_safetensors(tmp / component / variant_file(filename, variant), layout,
                              lambda key, c=component: producer(f"{c}/{key}"), dtype,
                              {**meta, "component": component})


def write_config_folder(cfg: SDXLConfig, out: Path) -> Path:
    """A diffusers pipeline folder without weights (model_index, every component's config,
    the tokenizers): what diffusers' single-file loading takes as `config=` so that it never
    reaches for a hub."""
    with atomic_dir(out, replace=True) as tmp:
        _write_configs(cfg, tmp)
    return out


def _write_configs(cfg: SDXLConfig, folder: Path) -> None:
    from ..tokenizer import write_tokenizer_files

    _write_json(folder / "model_index.json", model_index())
    for component, config in pipeline_configs(cfg).items():
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        _write_json(folder / component / name, config)
    write_tokenizer_files(folder / "tokenizer", cfg.conditioner.clip_l.pad_token)
    write_tokenizer_files(folder / "tokenizer_2", cfg.conditioner.clip_g.pad_token)


class _DiffusersProducer:
    """Makes diffusers tensors on demand from the sgm random tensors, one rule at a time."""

    def __init__(self, rules: List[KeyRule], get_sgm: Callable[[str], np.ndarray]):
        self._rule_of = {d: r for r in rules for d in r.diffusers}
        self._get = get_sgm
        self._pending: Dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._pending:
            r = self._rule_of[name]
            made = to_diffusers(r.kind, [self._get(n) for n in r.sgm])
            self._pending.update(zip(r.diffusers, made))
        return self._pending.pop(name)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cached_checkpoint(preset: str = "tiny", seed: int = 0, fmt: str = DIFFUSERS) -> Path:
    """A seeded checkpoint made once and reused (the embedded default of the CLIs)."""
    cfg = get_preset(preset)
    suffix = {SGM: ".safetensors", MINDSPORE: ".ckpt"}.get(fmt, "")
    path = cache_dir() / "checkpoints" / f"{preset}-seed{seed}-{fmt}-v{GENERATOR_VERSION}{suffix}"
    if not path.exists():
        try:
            make_checkpoint(cfg, seed, path, fmt)
        except (InputError, OSError):
            if not path.exists():  # a concurrent writer wins the rename race; anything else is real
                raise
    return path
