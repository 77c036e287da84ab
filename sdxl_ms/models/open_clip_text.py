"""OpenCLIP ViT-bigG/14 text tower in open_clip layout (sgm embedder 1).

sgm keeps open_clip's own names under `conditioner.embedders.1.model.`: a fused attention
input projection (`attn.in_proj_weight`, q/k/v stacked), bare `positional_embedding`,
`text_projection` (W, P) applied as `x @ P`, and the unused contrastive `logit_scale`.
Attribute order follows open_clip, so the layout lists names in the checkpoint's order.
"""
from __future__ import annotations

from typing import Tuple

from mindspore import Tensor, nn, ops

from ..config import TextEncoderConfig
from ..nn.layers import Embedding, LayerNorm, Linear, attend_t, linear_t, new_parameter
from ..nn.module import Module, Network, run_model
from .clip_text import ACTIVATIONS, as_ids, eos_positions, gather_rows


class MultiheadAttention(Module):
    """torch.nn.MultiheadAttention's parameter layout: one (3W, W) input projection. Causal
    self-attention of row-major tokens (B*L, W); the projection runs transposed, so q, k and v
    are row blocks of one GEMM's output."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = new_parameter((3 * width, width))
        self.in_proj_bias = new_parameter((3 * width,))
        self.out_proj = Linear(width, width)

    def forward(self, p, x, batch: int):
        w = self.width
        qkv = linear_t(x, p["in_proj_weight"], p["in_proj_bias"])
        heads_t = attend_t(qkv[:w], qkv[w:2 * w], qkv[2 * w:], batch, self.heads, causal=True)
        return self.out_proj.from_transposed(p, heads_t)


class MLP(Module):
    """c_proj(act(c_fc(x))); `act` is erf GELU for bigG."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.c_fc = Linear(cfg.width, cfg.mlp_width)
        self.c_proj = Linear(cfg.mlp_width, cfg.width)

    def forward(self, p, x):
        return self.c_proj(p, self.act(self.c_fc(p, x)))


class ResidualAttentionBlock(Module):
    """ln_1, causal self-attention, ln_2, MLP, each residual, on row-major tokens (B*L, W).
    One shared graph per structure in "blocks" mode."""

    graph_unit = True

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.attn = MultiheadAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, p, x, batch: int):
        x = self.attn(p, self.ln_1(p, x), batch) + x
        return self.mlp(p, self.ln_2(p, x)) + x


class Transformer(Module):
    """The residual blocks [first, last) on row-major tokens (B*L, W)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(cfg)
                                      for _ in range(cfg.layers)])

    def forward(self, p, x, batch: int, first: int, last: int):
        for i in range(first, last):
            x = self.resblocks[i](p, x, batch)
        return x


class OpenCLIPTextModel(Network):
    """open_clip's CLIP text tower (the visual tower dropped, as sgm does).

    `construct(ids)` returns (penultimate, pooled): penultimate is the input of the last block,
    no `ln_final` (B, L, W), i.e. diffusers' `hidden_states[-2]`; pooled is
    `ln_final(last)[EOS] @ text_projection` (B, P), diffusers' `text_embeds`.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if not cfg.projection_dim:
            raise ValueError("the OpenCLIP text tower needs cfg.projection_dim")
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = new_parameter((cfg.max_length, cfg.width))
        self.ln_final = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.text_projection = new_parameter((cfg.width, cfg.projection_dim))
        self.logit_scale = new_parameter(())  # contrastive temperature, unused for SDXL

    def construct(self, ids) -> Tuple[Tensor, Tensor]:
        return run_model(self, self.forward, as_ids(ids))

    def forward(self, ids):
        p = self  # the weights are the model's own (see sdxl_ms.nn.module)
        b, length = ids.shape
        n = self.cfg.layers
        x = self.token_embedding(p, ids) + p["positional_embedding"][:length]
        x = x.reshape(b * length, -1)
        x = self.transformer(p, x, b, 0, n - 1)
        penultimate = x.reshape(b, length, -1)
        last = self.ln_final(p, self.transformer(p, x, b, n - 1, n))
        last = last.reshape(b, length, -1)
        pooled = ops.matmul(gather_rows(last, eos_positions(ids)), p["text_projection"])
        return penultimate, pooled
