"""Explicit key maps between the sgm single-file layout (the port's own names) and diffusers.

A `KeyRule` ties one or more sgm tensors to one or more diffusers tensors with a named transform.
Diffusers names carry their component folder (``unet/...``, ``vae/...``, ``text_encoder/...``,
``text_encoder_2/...``) so that the whole pipeline lives in one flat namespace.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Tuple

import numpy as np

from ..config import SDXLConfig
from .key_rule import (CONV1X1_TO_LINEAR, COPY, KINDS, SPLIT_QKV, TRANSPOSE,  # noqa: F401
                       KeyRule, rule)  # re-exported: the key maps' vocabulary

# diffusers component folders and the file that holds each one's weights
COMPONENT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}


def prefixed(rules: Iterable[KeyRule], sgm_prefix: str, diffusers_prefix: str) -> List[KeyRule]:
    return [KeyRule(tuple(sgm_prefix + n for n in r.sgm),
                    tuple(diffusers_prefix + n for n in r.diffusers), r.kind) for r in rules]


# ---------------------------------------------------------------------------------------------
# tensor transforms


def to_diffusers(kind: str, tensors: List[np.ndarray]) -> List[np.ndarray]:
    (t,) = tensors
    if kind == COPY:
        return [t]
    if kind == TRANSPOSE:
        return [np.ascontiguousarray(t.T)]
    if kind == CONV1X1_TO_LINEAR:
        return [t.reshape(t.shape[0], t.shape[1])]
    if kind == SPLIT_QKV:
        return [np.ascontiguousarray(p) for p in np.split(t, 3, axis=0)]
    raise ValueError(kind)


def to_sgm(kind: str, tensors: List[np.ndarray]) -> List[np.ndarray]:
    if kind == COPY:
        return [tensors[0]]
    if kind == TRANSPOSE:
        return [np.ascontiguousarray(tensors[0].T)]
    if kind == CONV1X1_TO_LINEAR:
        t = tensors[0]
        return [t.reshape(t.shape[0], t.shape[1], 1, 1)]
    if kind == SPLIT_QKV:
        return [np.concatenate(tensors, axis=0)]
    raise ValueError(kind)


def diffusers_shapes(kind: str, shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    """Shapes of the diffusers tensors made from one sgm tensor of `shape`."""
    if kind == COPY:
        return [tuple(shape)]
    if kind == TRANSPOSE:
        return [tuple(reversed(shape))]
    if kind == CONV1X1_TO_LINEAR:
        return [tuple(shape[:2])]
    if kind == SPLIT_QKV:
        return [(shape[0] // 3,) + tuple(shape[1:])] * 3
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# whole-pipeline maps


def pipeline_rules(cfg: SDXLConfig) -> List[KeyRule]:
    """Every rule for a whole SDXL checkpoint, in module-tree order."""
    from .keymap_text import clip_g_rules, clip_l_rules
    from .keymap_unet import unet_rules
    from .keymap_vae import vae_rules

    return (prefixed(clip_l_rules(cfg.conditioner.clip_l),
                     "conditioner.embedders.0.transformer.", "text_encoder/")
            + prefixed(clip_g_rules(cfg.conditioner.clip_g),
                       "conditioner.embedders.1.model.", "text_encoder_2/")
            + prefixed(unet_rules(cfg.unet), "model.diffusion_model.", "unet/")
            + prefixed(vae_rules(cfg.vae), "first_stage_model.", "vae/"))


def convert_to_diffusers(rules: Iterable[KeyRule],
                         get: Callable[[str], np.ndarray]) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (diffusers name, tensor) pairs, reading each sgm tensor once through `get`."""
    for r in rules:
        for name, t in zip(r.diffusers, to_diffusers(r.kind, [get(n) for n in r.sgm])):
            yield name, t


def convert_to_sgm(rules: Iterable[KeyRule],
                   get: Callable[[str], np.ndarray]) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (sgm name, tensor) pairs, reading the diffusers tensors of each rule through `get`."""
    for r in rules:
        for name, t in zip(r.sgm, to_sgm(r.kind, [get(n) for n in r.diffusers])):
            yield name, t


def sgm_layout_to_diffusers(rules: Iterable[KeyRule],
                            sgm_shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    out: Dict[str, Tuple[int, ...]] = {}
    for r in rules:
        for name, shape in zip(r.diffusers, diffusers_shapes(r.kind, sgm_shapes[r.sgm[0]])):
            out[name] = shape
    return out


def split_component(name: str) -> Tuple[str, str]:
    """'unet/conv_in.weight' -> ('unet', 'conv_in.weight')."""
    component, _, key = name.partition("/")
    if component not in COMPONENT_FILES or not key:
        raise ValueError(f"not a diffusers pipeline key: {name!r}")
    return component, key
