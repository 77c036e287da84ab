"""OpenCLIP ViT-bigG/14 text tower in open_clip layout (sgm embedder 1).

sgm keeps open_clip's own names under `conditioner.embedders.1.model.`: a fused attention
input projection (`attn.in_proj_weight`, q/k/v stacked), bare `positional_embedding`,
`text_projection` (W, P) applied as `x @ P`, and the unused contrastive `logit_scale`.
Attribute order follows open_clip, so the layout lists names in the checkpoint's order.
"""
from __future__ import annotations

from typing import Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import TextEncoderConfig
from ..nn.layers import Embedding, LayerNorm, Linear, new_parameter, attention
from .clip_text import ACTIVATIONS, as_ids, causal_mask, eos_positions, gather_rows


class MultiheadAttention(nn.Cell):
    """torch.nn.MultiheadAttention's parameter layout: one (3W, W) input projection."""

    def __init__(self, width: int, heads: int, dtype):
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = new_parameter((3 * width, width), dtype)
        self.in_proj_bias = new_parameter((3 * width,), dtype)
        self.out_proj = Linear(width, width, dtype=dtype)
        self._matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, mask):
        b, length, w = x.shape
        qkv = self._matmul(x.reshape(b * length, w), self.in_proj_weight) + self.in_proj_bias
        q, k, v = ops.split(qkv.reshape(b, length, 3 * w), w, axis=-1)
        return self.out_proj(attention(q, k, v, self.heads, mask))


class MLP(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.c_fc = Linear(cfg.width, cfg.mlp_width, dtype=dtype)
        self.c_proj = Linear(cfg.mlp_width, cfg.width, dtype=dtype)

    def construct(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.attn = MultiheadAttention(cfg.width, cfg.heads, dtype)
        self.ln_2 = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(cfg, dtype)
                                      for _ in range(cfg.layers)])


class OpenCLIPTextModel(nn.Cell):
    """open_clip's CLIP text tower (the visual tower dropped, as sgm does).

    `construct(ids)` returns (penultimate, pooled): penultimate is the input of the last block,
    no `ln_final` (B, L, W), i.e. diffusers' `hidden_states[-2]`; pooled is
    `ln_final(last)[EOS] @ text_projection` (B, P), diffusers' `text_embeds`.
    """

    def __init__(self, cfg: TextEncoderConfig, dtype=ms.float32):
        super().__init__()
        if not cfg.projection_dim:
            raise ValueError("the OpenCLIP text tower needs cfg.projection_dim")
        self.cfg = cfg
        self.transformer = Transformer(cfg, dtype)
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width, dtype=dtype)
        self.positional_embedding = new_parameter((cfg.max_length, cfg.width), dtype)
        self.ln_final = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.text_projection = new_parameter((cfg.width, cfg.projection_dim), dtype)
        self.logit_scale = new_parameter((), dtype)  # contrastive temperature, unused for SDXL

    def construct(self, ids) -> Tuple[Tensor, Tensor]:
        ids = as_ids(ids)
        length = ids.shape[-1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        mask = causal_mask(length)
        blocks = self.transformer.resblocks
        for i in range(self.cfg.layers - 1):
            x = blocks[i](x, mask)
        penultimate = x
        last = self.ln_final(blocks[self.cfg.layers - 1](x, mask))
        pooled = ops.matmul(gather_rows(last, eos_positions(ids)), self.text_projection)
        return penultimate, pooled
