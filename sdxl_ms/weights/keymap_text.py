"""Key rules for the two text encoders: sgm names <-> diffusers `text_encoder*/` names.

sgm names are relative to `conditioner.embedders.0.transformer.` (CLIP-L) and
`conditioner.embedders.1.model.` (OpenCLIP-bigG); diffusers names are relative to the
`text_encoder/` and `text_encoder_2/` folders.

Diffusers-side names are the on-disk names with the `text_model.` prefix, as in the published
SDXL folders and as transformers 4.x saves them. transformers 5.x builds `CLIPTextModel` without
that level (its state dict and `save_pretrained` use `embeddings...`) but strips the prefix when
loading, so files written with these names load in both; a 5.x-saved folder is read through
`canonical_text_encoder_key`. `CLIPTextModelWithProjection` keeps `text_model.` in both versions.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np

from ..config import TextEncoderConfig
from .key_rule import SPLIT_QKV, TRANSPOSE, KeyRule, rule

TEXT_MODEL_PREFIX = "text_model."

# Present in sgm checkpoints but with no diffusers counterpart. open_clip's contrastive
# temperature is unused by SDXL; diffusers -> sgm writes open_clip's initial value log(1/0.07).
CLIP_G_SGM_ONLY = ("logit_scale",)
LOGIT_SCALE_INIT = math.log(1 / 0.07)

# Non-parameter buffers some checkpoints carry (either side, relative names): tolerated when
# present, never required, never written.
TEXT_BUFFERS = ("text_model.embeddings.position_ids", "embeddings.position_ids")


def sgm_only_tensor(name: str) -> np.ndarray:
    """The value written for an sgm-only CLIP-G tensor when converting diffusers -> sgm."""
    if name != "logit_scale":
        raise KeyError(name)
    return np.array(LOGIT_SCALE_INIT, dtype=np.float32)


def is_text_buffer(name: str) -> bool:
    return any(name == b or name.endswith("." + b) for b in TEXT_BUFFERS)


def canonical_text_encoder_key(key: str) -> str:
    """A `text_encoder/` file key in the rules' spelling (adds `text_model.` when missing)."""
    return key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key


def _hf_layer_names(i: int) -> List[str]:
    """One Hugging Face CLIP encoder layer's names (relative to `text_model.`), in state-dict
    order (k, v, q, out as transformers registers them)."""
    subs = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
            "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
    return [f"encoder.layers.{i}.{sub}.{leaf}" for sub in subs for leaf in ("weight", "bias")]


def clip_l_rules(cfg: TextEncoderConfig) -> List[KeyRule]:
    """CLIP-L: sgm stores the Hugging Face model itself, so every rule is an identity copy."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for i in range(cfg.layers):
        names += _hf_layer_names(i)
    names += ["final_layer_norm.weight", "final_layer_norm.bias"]
    return [rule(TEXT_MODEL_PREFIX + n, TEXT_MODEL_PREFIX + n) for n in names]


def clip_g_rules(cfg: TextEncoderConfig) -> List[KeyRule]:
    """OpenCLIP-bigG -> `CLIPTextModelWithProjection`, in the sgm checkpoint's order."""
    t = TEXT_MODEL_PREFIX
    out = [rule("positional_embedding", t + "embeddings.position_embedding.weight"),
           # sgm: (W, P) used as x @ P; transformers: Linear weight (P, W)
           rule("text_projection", "text_projection.weight", TRANSPOSE)]
    renamed = {"attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(cfg.layers):
        s, d = f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        out.append(rule(s + "ln_1.weight", d + "layer_norm1.weight"))
        out.append(rule(s + "ln_1.bias", d + "layer_norm1.bias"))
        for leaf in ("weight", "bias"):
            out.append(KeyRule((f"{s}attn.in_proj_{leaf}",),
                               tuple(f"{d}self_attn.{p}_proj.{leaf}" for p in "qkv"), SPLIT_QKV))
        for src, dst in renamed.items():
            for leaf in ("weight", "bias"):
                out.append(rule(f"{s}{src}.{leaf}", f"{d}{dst}.{leaf}"))
    out += [rule("token_embedding.weight", t + "embeddings.token_embedding.weight"),
            rule("ln_final.weight", t + "final_layer_norm.weight"),
            rule("ln_final.bias", t + "final_layer_norm.bias")]
    return out


__all__ = ["CLIP_G_SGM_ONLY", "LOGIT_SCALE_INIT", "TEXT_BUFFERS", "canonical_text_encoder_key",
           "clip_g_rules", "clip_l_rules", "is_text_buffer", "sgm_only_tensor"]
