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
from ..backend import run_graph, run_model
from ..nn.layers import (Embedding, LayerNorm, Linear, attend_t, layer_norm,
                         linear_from_t, linear_t, new_parameter, weights_of)
from .clip_text import ACTIVATIONS, as_ids, eos_positions, gather_rows, mlp


class MultiheadAttention(nn.Cell):
    """torch.nn.MultiheadAttention's parameter layout: one (3W, W) input projection. Weights
    only: the forward is `_open_clip_block`."""

    def __init__(self, width: int, heads: int, dtype):
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = new_parameter((3 * width, width), dtype)
        self.in_proj_bias = new_parameter((3 * width,), dtype)
        self.out_proj = Linear(width, width, dtype=dtype)


class MLP(nn.Cell):
    """Weights and activation only: the forward is `clip_text.mlp`."""

    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.c_fc = Linear(cfg.width, cfg.mlp_width, dtype=dtype)
        self.c_proj = Linear(cfg.mlp_width, cfg.width, dtype=dtype)


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.cfg = cfg
        self.ln_1 = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.attn = MultiheadAttention(cfg.width, cfg.heads, dtype)
        self.ln_2 = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype)

    def run_tokens(self, x, batch: int):
        """The block with causal self-attention on row-major tokens x (B*L, W): one graph in
        jit "blocks" mode."""
        a, m = self.attn, self.mlp
        w = weights_of(self, [self.ln_1.weight, self.ln_1.bias, a.in_proj_weight, a.in_proj_bias,
                              a.out_proj.weight, a.out_proj.bias, self.ln_2.weight, self.ln_2.bias,
                              m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias])
        return run_graph(_open_clip_block, m.act, x, w, batch, self.cfg.heads,
                         (self.ln_1.eps, self.ln_2.eps))


def _open_clip_block(act, x, w, batch: int, heads: int, eps):
    """ln_1, causal self-attention with the fused (3W, W) input projection, ln_2, MLP. The
    projection runs transposed, so q, k and v are row blocks of one GEMM's output."""
    width = x.shape[1]
    qkv = linear_t(layer_norm(x, w[0], w[1], eps[0]), w[2], w[3])
    out_t = attend_t(qkv[:width], qkv[width:2 * width], qkv[2 * width:], batch, heads, causal=True)
    x = linear_from_t(out_t, w[4], w[5]) + x
    return mlp(layer_norm(x, w[6], w[7], eps[1]), w[8:12], act) + x


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
        return run_model(self, self._forward, as_ids(ids))

    def _forward(self, ids):
        b, length = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        x = x.reshape(b * length, -1)
        blocks = self.transformer.resblocks
        for i in range(self.cfg.layers - 1):
            x = blocks[i].run_tokens(x, b)
        penultimate = x.reshape(b, length, -1)
        last = self.ln_final(blocks[self.cfg.layers - 1].run_tokens(x, b)).reshape(b, length, -1)
        pooled = ops.matmul(gather_rows(last, eos_positions(ids)), self.text_projection)
        return penultimate, pooled
