"""sgm's `UNetModel` as SDXL uses it, in MindSpore, with sgm's module tree and parameter names.

input_blocks / middle_block / output_blocks are lists of `TimestepEmbedSequential` holding
`ResBlock`, `SpatialTransformer` (linear projections), `Downsample` (`op`) and `Upsample` (`conv`).
The time embedding plus the `label_emb` of the conditioner's vector condition every ResBlock.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config import UNetConfig
from ..nn.layers import (Conv2d, GroupNorm, Identity, LayerNorm, Linear, SiLU, attention, gelu,
                         timestep_embedding, Upsample)

TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm in front of the spatial transformer
RESBLOCK_NORM_EPS = 1e-5
LAYER_NORM_EPS = 1e-5


class ResBlock(nn.Cell):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dtype):
        super().__init__()
        self.in_layers = nn.SequentialCell([
            GroupNorm(groups, channels, RESBLOCK_NORM_EPS, dtype), SiLU(),
            Conv2d(channels, out_channels, 3, padding=1, dtype=dtype)])
        self.emb_layers = nn.SequentialCell([SiLU(), Linear(emb_channels, out_channels, dtype=dtype)])
        self.out_layers = nn.SequentialCell([
            GroupNorm(groups, out_channels, RESBLOCK_NORM_EPS, dtype), SiLU(), Identity(),  # dropout
            Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)])
        self.skip_connection = (Identity() if channels == out_channels
                                else Conv2d(channels, out_channels, 1, dtype=dtype))

    def construct(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).reshape(emb.shape[0], -1, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Cell):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dtype):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False, dtype=dtype)
        self.to_k = Linear(context_dim, inner, bias=False, dtype=dtype)
        self.to_v = Linear(context_dim, inner, bias=False, dtype=dtype)
        self.to_out = nn.SequentialCell([Linear(inner, query_dim, dtype=dtype), Identity()])

    def construct(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int, dtype):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2, dtype=dtype)

    def construct(self, x):
        x, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return x * gelu(gate)


class FeedForward(nn.Cell):
    def __init__(self, dim: int, dtype, mult: int = 4):
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, dim * mult, dtype), Identity(),
                                      Linear(dim * mult, dim, dtype=dtype)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dtype):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, dtype)
        self.ff = FeedForward(dim, dtype)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dtype)
        self.norm1 = LayerNorm(dim, LAYER_NORM_EPS, dtype)
        self.norm2 = LayerNorm(dim, LAYER_NORM_EPS, dtype)
        self.norm3 = LayerNorm(dim, LAYER_NORM_EPS, dtype)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 groups: int, dtype):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, TRANSFORMER_NORM_EPS, dtype)
        self.proj_in = Linear(channels, inner, dtype=dtype)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dtype) for _ in range(depth)])
        self.proj_out = Linear(inner, channels, dtype=dtype)

    def construct(self, x, context):
        b, c, h, w = x.shape
        t = self.norm(x).reshape(b, c, h * w).transpose(0, 2, 1)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t)
        return t.transpose(0, 2, 1).reshape(b, c, h, w) + x


class Downsample(nn.Cell):
    def __init__(self, channels: int, dtype):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype)

    def construct(self, x):
        return self.op(x)


class TimestepEmbedSequential(nn.CellList):
    """Runs its layers in order, handing each the inputs its type needs."""

    def construct(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Cell):
    def __init__(self, cfg: UNetConfig, dtype=ms.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.heads(ch), cfg.num_head_channels, depth,
                                      cfg.context_dim, groups, dtype)

        self.time_embed = nn.SequentialCell([Linear(mc, ted, dtype=dtype), SiLU(),
                                             Linear(ted, ted, dtype=dtype)])
        self.label_emb = nn.SequentialCell([nn.SequentialCell([
            Linear(cfg.adm_in_channels, ted, dtype=dtype), SiLU(), Linear(ted, ted, dtype=dtype)])])

        blocks = [TimestepEmbedSequential([Conv2d(cfg.in_channels, mc, 3, padding=1, dtype=dtype)])]
        skip_channels = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, groups, dtype)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != last:
                blocks.append(TimestepEmbedSequential([Downsample(ch, dtype)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(blocks)

        self.middle_block = TimestepEmbedSequential([
            ResBlock(ch, ted, ch, groups, dtype), transformer(ch, cfg.transformer_depth_middle),
            ResBlock(ch, ted, ch, groups, dtype)])

        blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mult * mc, groups, dtype)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, dtype))
                blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)

        self.out = nn.SequentialCell([GroupNorm(groups, ch, RESBLOCK_NORM_EPS, dtype), SiLU(),
                                      Conv2d(mc, cfg.out_channels, 3, padding=1, dtype=dtype)])

    def construct(self, x, timesteps, context, y):
        """x (B,4,h,w), timesteps (B,) float, context (B,77,ctx), y (B,adm) -> eps (B,4,h,w)."""
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).astype(self.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.astype(self.dtype))
        context = context.astype(self.dtype)
        h = x.astype(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(ops.cat([h, skips.pop()], axis=1), emb, context)
        return self.out(h)
