"""sgm `GeneralConditioner` for SDXL: two text towers and three size/crop embedders.

The module tree mirrors sgm so parameters are named `embedders.0.transformer.text_model...`
and `embedders.1.model...`; the size embedders hold no parameters. Instead of sgm's generic
per-embedder dispatch, the SDXL outputs are explicit methods:
  crossattn = concat(CLIP-L penultimate, bigG penultimate)     (B, 77, 768 + 1280)
  vector    = concat(bigG pooled, 6 size embeddings)           (B, 1280 + 6 * 256)
"""
from __future__ import annotations

from typing import Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import ConditionerConfig, TextEncoderConfig
from ..nn.layers import timestep_embedding
from .clip_text import CLIPTextModel
from .open_clip_text import OpenCLIPTextModel


class FrozenCLIPEmbedder(nn.Cell):
    """CLIP-L; sgm uses the hidden state after layer `layers - 1`, no final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.transformer = CLIPTextModel(cfg)

    def construct(self, ids) -> Tensor:
        return self.transformer.penultimate(ids)


class FrozenOpenCLIPEmbedder2(nn.Cell):
    """OpenCLIP-bigG; sgm uses the penultimate hidden state and the projected pooled output."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(cfg)

    def construct(self, ids) -> Tuple[Tensor, Tensor]:
        return self.model(ids)


class ConcatTimestepEmbedderND(nn.Cell):
    """Each scalar of a (B, n) input -> a sinusoid of width `outdim` (cos half first), all
    concatenated: (B, n * outdim)."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def construct(self, x) -> Tensor:
        b = x.shape[0]
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, -1)


class GeneralConditioner(nn.Cell):
    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        self.cfg = cfg
        self.embedders = nn.CellList([
            FrozenCLIPEmbedder(cfg.clip_l),
            FrozenOpenCLIPEmbedder2(cfg.clip_g),
            ConcatTimestepEmbedderND(cfg.size_embed_dim),  # original_size (h, w)
            ConcatTimestepEmbedderND(cfg.size_embed_dim),  # crop_coords_top_left (top, left)
            ConcatTimestepEmbedderND(cfg.size_embed_dim),  # target_size (h, w)
        ])

    def encode_text(self, input_ids, input_ids_2) -> Tuple[Tensor, Tensor]:
        """(crossattn (B, 77, context_dim), pooled (B, pooled_dim)) from the two tokenizers' ids."""
        hidden_l = self.embedders[0](input_ids)
        hidden_g, pooled = self.embedders[1](input_ids_2)
        return ops.cat([hidden_l, hidden_g.astype(hidden_l.dtype)], axis=-1), pooled

    def embed_sizes(self, time_ids) -> Tensor:
        """(B, 6) = (orig_h, orig_w, crop_top, crop_left, tgt_h, tgt_w) -> (B, 6 * size_embed_dim).

        Computed in float32; equals diffusers' `add_time_proj(time_ids.flatten())` reshaped.
        """
        if not isinstance(time_ids, Tensor):
            time_ids = Tensor(np.asarray(time_ids, dtype=np.float32))
        time_ids = time_ids.astype(ms.float32)
        if time_ids.ndim != 2 or time_ids.shape[1] != 6:
            raise ValueError(f"time_ids must be (B, 6), got {tuple(time_ids.shape)}")
        parts = [self.embedders[2 + i](time_ids[:, 2 * i:2 * i + 2]) for i in range(3)]
        return ops.cat(parts, axis=-1)

    def vector(self, pooled, time_ids) -> Tensor:
        """The UNet's `y` / diffusers' concat(text_embeds, time embeds): (B, vector_dim)."""
        return ops.cat([pooled, self.embed_sizes(time_ids).astype(pooled.dtype)], axis=-1)

    def construct(self, input_ids, input_ids_2, time_ids) -> Tuple[Tensor, Tensor]:
        """(crossattn, vector) for one batch of prompts and size conditions."""
        crossattn, pooled = self.encode_text(input_ids, input_ids_2)
        return crossattn, self.vector(pooled, time_ids)
