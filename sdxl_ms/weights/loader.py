"""Check a checkpoint against the layout the port expects, then stream it into the model.

Every problem (missing, unexpected and shape-mismatched names) is collected and reported in one
message before anything is loaded. Tensors are read, converted and assigned one at a time, so
loading never holds a second full copy of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..config import PRESETS, SDXLConfig
from .checkpoint import DIFFUSERS, SGM_NAMED, open_checkpoint
from .keymap import convert_to_sgm, pipeline_rules, sgm_layout_to_diffusers, to_sgm
from .safetensors_io import CheckpointError

# buffers some checkpoints carry that hold no learned weights
IGNORED_SUFFIXES = ("position_ids",)

Layout = Dict[str, Tuple[int, ...]]


@lru_cache(maxsize=None)
def _sgm_layout(preset_name: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    from ..models.sdxl import sgm_layout

    return tuple(sgm_layout(PRESETS[preset_name]).items())


def expected_layout(cfg: SDXLConfig, fmt: str) -> Layout:
    """Names and shapes the port expects for `cfg` in checkpoint format `fmt`."""
    sgm = dict(_sgm_layout(cfg.name)) if cfg.name in PRESETS else _fresh_layout(cfg)
    if fmt in SGM_NAMED:
        return sgm
    if fmt == DIFFUSERS:
        return sgm_layout_to_diffusers(pipeline_rules(cfg), sgm)
    raise ValueError(f"unknown checkpoint format {fmt!r}")


def _fresh_layout(cfg: SDXLConfig) -> Layout:
    from ..models.sdxl import sgm_layout

    return sgm_layout(cfg)


@dataclass
class LayoutDiff:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def describe(self, limit: int = 8) -> str:
        def part(title, items):
            if not items:
                return None
            shown = ", ".join(items[:limit])
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            return f"{len(items)} {title}: {shown}{more}"

        shapes = [f"{n} {tuple(got)} != expected {tuple(want)}" for n, got, want in self.mismatched]
        parts = [part("missing", self.missing), part("unexpected", self.unexpected),
                 part("shape-mismatched", shapes)]
        return "; ".join(p for p in parts if p) or "layout matches"


def diff_layout(expected: Mapping[str, Tuple[int, ...]], actual: Mapping[str, Tuple[int, ...]]) -> LayoutDiff:
    actual = {k: v for k, v in actual.items() if not k.endswith(IGNORED_SUFFIXES)}
    return LayoutDiff(
        missing=[k for k in expected if k not in actual],
        unexpected=[k for k in actual if k not in expected],
        mismatched=[(k, tuple(actual[k]), tuple(expected[k])) for k in expected
                    if k in actual and tuple(actual[k]) != tuple(expected[k])],
    )


def preset_name_of(path) -> Optional[str]:
    """The name of the preset whose layout the checkpoint at `path` holds; None for a
    diffusers folder of widths of its own."""
    name = infer_preset(open_checkpoint(Path(path))).name
    return name if name in PRESETS else None


def infer_preset(ckpt) -> SDXLConfig:
    """The preset whose layout the checkpoint matches exactly; for a diffusers folder of other
    widths, the config its own config.json files describe; else a CheckpointError naming the
    differences against the closest preset."""
    diffs = {name: diff_layout(expected_layout(cfg, ckpt.format), ckpt.shapes)
             for name, cfg in PRESETS.items()}
    for name, d in diffs.items():
        if d.ok:
            return PRESETS[name]
    own = _config_of_folder(ckpt) if ckpt.format == DIFFUSERS else None
    if own is not None and diff_layout(expected_layout(own, DIFFUSERS), ckpt.shapes).ok:
        return own
    closest = min(diffs, key=lambda n: diffs[n].size)
    raise CheckpointError(f"{ckpt.path} ({ckpt.format} format) does not match the '{closest}' "
                          f"layout: {diffs[closest].describe()}")


def _config_of_folder(ckpt):
    """The SDXLConfig a diffusers folder's config files describe, or None when they describe
    no SDXL the port can build."""
    from .checkpoint import pad_tokens
    from .diffusers_configs import sdxl_config_from_diffusers

    try:
        return sdxl_config_from_diffusers(ckpt.configs, pad_tokens(ckpt.path),
                                          name=f"config:{ckpt.path.name}")
    except (KeyError, TypeError, ValueError):
        return None


def check_layout(ckpt, cfg: SDXLConfig) -> None:
    d = diff_layout(expected_layout(cfg, ckpt.format), ckpt.shapes)
    if not d.ok:
        raise CheckpointError(f"{ckpt.path} ({ckpt.format} format) does not match the "
                              f"'{cfg.name}' layout: {d.describe()}")


def sgm_tensors(ckpt, cfg: SDXLConfig, names: Iterable[str]) -> Iterator[Tuple[str, np.ndarray]]:
    """(sgm name, tensor) for every name in `names` (the port's parameters, in order), read one
    at a time from a checkpoint of any format: sgm-named formats by name, a diffusers folder
    through the key maps (a fused tensor is read from its parts)."""
    names = list(names)
    if ckpt.format in SGM_NAMED:
        yield from ((name, ckpt.get(name)) for name in names)
        return
    rules = pipeline_rules(cfg)
    yield from convert_to_sgm(rules, ckpt.get)
    covered = {n for r in rules for n in r.sgm}
    yield from ((n, _sgm_only(n)) for n in names if n not in covered)


def sgm_getter(ckpt, cfg: SDXLConfig) -> Callable[[str], np.ndarray]:
    """Random access by sgm name into a checkpoint of any format (`KeyError` for a name it
    does not hold): a diffusers tensor is converted through its key-map rule, the last rule's
    outputs kept, so the three sgm names of one fused rule read its parts once."""
    if ckpt.format in SGM_NAMED:
        return ckpt.get
    by_name = {name: rule for rule in pipeline_rules(cfg) for name in rule.sgm}
    last: Dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in last:
            rule = by_name.get(name)
            if rule is None:
                return _sgm_only(name)
            last.clear()
            last.update(zip(rule.sgm, to_sgm(rule.kind, [ckpt.get(d) for d in rule.diffusers])))
        return last[name]

    return get


def load_weights(model, ckpt) -> None:
    """Stream `ckpt` into `model` (an `SDXL` cell), converting diffusers names and layouts."""
    from .state import named_parameters, set_weights

    from sdxl_common.progress import bar

    check_layout(ckpt, model.cfg)
    params = named_parameters(model)
    with bar(total=len(params), desc="loading weights", unit="tensor") as progress:
        def counted(items):
            for item in items:
                yield item
                progress.update(1)

        set_weights(model, counted(sgm_tensors(ckpt, model.cfg, params)))


def _sgm_only(name: str):
    """sgm tensors diffusers does not store (OpenCLIP's unused logit_scale)."""
    from .keymap_text import sgm_only_tensor

    try:
        return sgm_only_tensor(name.rpartition(".")[2])
    except KeyError:
        raise CheckpointError(f"no diffusers source for sgm tensor {name}") from None
