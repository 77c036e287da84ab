"""float16 precision bugs a port can have, written as replacements of the port's own functions
(monkeypatched in by tests and by tools/precision_bugs.py, never a product flag). Each does in
float16 what the faithful port does in float32, as a port written without the upcasts would.

  softmax    attention scores scaled and softmaxed in float16 (no float32 upcast)
  groupnorm  GroupNorm's mean and variance computed in float16
  timestep   the sinusoidal timestep embedding computed in float16
  vae        the VAE decoded in float16, without the float32 copy diffusers decodes in
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

import sdxl_ms.nn.layers as layers
from sdxl_ms.pipeline import SDXLPipeline

_faithful_group_norm = layers.group_norm


def attention_softmax_in_float16(q_t, k_t, v_t, heads: int, mask=None):
    inner, length = q_t.shape
    d = inner // heads
    scores = layers._BMM_TN(q_t.reshape(heads, d, length), k_t.reshape(heads, d, k_t.shape[1]))
    scores = scores * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs = ops.softmax(scores, axis=-1)
    out = layers._BMM_NT(v_t.reshape(heads, d, v_t.shape[1]), probs.astype(v_t.dtype))
    return out.reshape(inner, length)


def group_norm_statistics_in_float16(x, groups: int, weight, bias, eps: float):
    if x.dtype == ms.float32:
        return _faithful_group_norm(x, groups, weight, bias, eps)
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    mean = g.mean(-1, keep_dims=True)
    var = ((g - mean) ** 2).mean(-1, keep_dims=True)
    y = ((g - mean) / ops.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * weight.reshape(shape).astype(x.dtype) + bias.reshape(shape).astype(x.dtype)


def timestep_embedding_in_float16(t, dim: int, max_period: float = 10000.0):
    half = dim // 2
    freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half) / half).astype(np.float16))
    args = t.astype(ms.float16).reshape(-1, 1) * freqs.reshape(1, -1)
    return ops.cat([ops.cos(args), ops.sin(args)], axis=-1)


def _vae_without_upcast(self):
    return self.model.first_stage_model


# bug -> [(object, attribute, replacement)], and the stage it must fail at with module truths
BUGS: Dict[str, List[Tuple[object, str, Callable]]] = {
    "softmax": [(layers, "attention_heads_t", attention_softmax_in_float16)],
    "groupnorm": [(layers, "group_norm", group_norm_statistics_in_float16)],
    "timestep": [(layers, "timestep_embedding", timestep_embedding_in_float16)],
    "vae": [(SDXLPipeline, "decoding_vae", _vae_without_upcast)],
}
FAILS_AT = {"softmax": "conditioner", "groupnorm": "unet", "timestep": "unet", "vae": "decode"}


def inject(bug: str, setattr_=setattr) -> None:
    """Put `bug` into the port (`setattr_`: pytest's monkeypatch.setattr, to undo it)."""
    for owner, name, replacement in BUGS[bug]:
        setattr_(owner, name, replacement)
