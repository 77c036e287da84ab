"""sgm's `UNetModel` as SDXL uses it, in MindSpore, with sgm's module tree and parameter names.

input_blocks / middle_block / output_blocks are lists of `TimestepEmbedSequential` holding
`ResBlock`, `SpatialTransformer` (linear projections), `Downsample` (`op`) and `Upsample` (`conv`).
The time embedding plus the `label_emb` of the conditioner's vector condition every ResBlock.
"""
from __future__ import annotations

from mindspore import nn, ops

from ..config import UNetConfig
from ..nn.layers import (Conv2d, GroupNorm, Identity, LayerNorm, Linear, SinusoidalTimesteps,
                         SiLU, Upsample, add_channel_bias_per_image, attend_projections_t,
                         attention_t, gelu)
from ..nn.module import Module, Network, Sequential, run_model

TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm in front of the spatial transformer
RESBLOCK_NORM_EPS = 1e-5
LAYER_NORM_EPS = 1e-5


class ResBlock(Module):
    """in_layers (norm, SiLU, conv), plus the time embedding per channel, out_layers (norm, SiLU,
    dropout, conv), plus the skip (a 1x1 conv when the width changes)."""

    graph_unit = True

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = Sequential([
            GroupNorm(groups, channels, RESBLOCK_NORM_EPS), SiLU(),
            Conv2d(channels, out_channels, 3, padding=1)])
        self.emb_layers = Sequential([SiLU(), Linear(emb_channels, out_channels)])
        self.out_layers = Sequential([
            GroupNorm(groups, out_channels, RESBLOCK_NORM_EPS), SiLU(), Identity(),  # dropout
            Conv2d(out_channels, out_channels, 3, padding=1)])
        self.skip_connection = (Identity() if channels == out_channels
                                else Conv2d(channels, out_channels, 1))

    def forward(self, p, x, emb):
        h = self.in_layers(p, x)
        h = add_channel_bias_per_image(h, self.emb_layers(p, emb))
        h = self.out_layers(p, h)
        return self.skip_connection(p, x) + h


class CrossAttention(Module):
    """Multi-head attention of row-major tokens x (B*L, C) over a context (B*Lk, Cc), or over
    themselves when the context is None. The heads' outputs come out transposed (inner, B*L),
    so `to_out` applies without a copy (`Linear.from_transposed`)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = Sequential([Linear(inner, query_dim), Identity()])

    def forward(self, p, x, context, batch: int):
        if self.observing:  # watched (a class constant graph mode folds): q, k, v via the children
            ctx = x if context is None else context
            heads_t = attend_projections_t(self.to_q.transposed_out(p, x),
                                           self.to_k.transposed_out(p, ctx),
                                           self.to_v.transposed_out(p, ctx), batch, self.heads)
        else:
            heads_t = attention_t(x, context, batch, self.heads, p["to_q"]["weight"],
                                  p["to_k"]["weight"], p["to_v"]["weight"])
        return self.to_out[0].from_transposed(p, heads_t)  # to_out: Sequential(Linear, Dropout)


class GEGLU(Module):
    """proj(x) split in two halves, a * gelu(b). Computed in the transposed layout, where the
    halves are blocks of rows rather than strided column halves (a strided view costs a slow
    copy); returns the transposed (inner, N) activations."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, p, x):
        y_t = self.proj.transposed_out(p, x)
        inner = y_t.shape[0] // 2
        return y_t[:inner] * gelu(y_t[inner:])


class FeedForward(Module):
    """GEGLU, dropout, Linear, on row-major tokens."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = Sequential([GEGLU(dim, dim * mult), Identity(), Linear(dim * mult, dim)])

    def forward(self, p, x):
        # net is sgm's Sequential(GEGLU, Dropout, Linear); GEGLU's output is transposed
        return self.net[2].from_transposed(p, self.net[0](p, x))


class BasicTransformerBlock(Module):
    """Self-attention, cross-attention over the text context, feed-forward; each pre-normed
    and residual. Tokens are row-major (B*L, C)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = LayerNorm(dim, LAYER_NORM_EPS)
        self.norm2 = LayerNorm(dim, LAYER_NORM_EPS)
        self.norm3 = LayerNorm(dim, LAYER_NORM_EPS)

    def forward(self, p, x, context, batch: int):
        x = self.attn1(p, self.norm1(p, x), None, batch) + x
        x = self.attn2(p, self.norm2(p, x), context, batch) + x
        return self.ff(p, self.norm3(p, x)) + x


class SpatialTransformer(Module):
    """GroupNorm, proj_in to tokens, the transformer blocks, proj_out back to the map, + x.
    One graph for the whole stack in "blocks" mode (*measured*: a graph call costs ~0.5 ms of
    dispatch on CPU)."""

    graph_unit = True

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 groups: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, TRANSFORMER_NORM_EPS)
        self.proj_in = Linear(channels, inner)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = Linear(inner, channels)

    def forward(self, p, x, context):
        tokens = self.proj_in.from_channels_first(p, self.norm(p, x))
        context = context.reshape(-1, context.shape[-1])
        for block in self.transformer_blocks:
            tokens = block(p, tokens, context, x.shape[0])
        return self.proj_out.to_channels_first(p, tokens, x.shape) + x


class Downsample(Module):
    """A stride-2 3x3 conv named `op` (symmetric padding 1, as sgm and diffusers pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, p, x):
        return self.op(p, x)


class TimestepEmbedSequential(Sequential):
    """Runs its layers in order, handing each the inputs its type needs."""

    def forward(self, p, x, emb, context):
        for name in self.layer_names:
            layer = getattr(self, name)
            if isinstance(layer, ResBlock):
                x = layer(p, x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(p, x, context)
            else:
                x = layer(p, x)
        return x


class UNetModel(Network):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.heads(ch), cfg.num_head_channels, depth,
                                      cfg.context_dim, groups)

        self.time_proj = SinusoidalTimesteps(mc)
        self.time_embed = Sequential([Linear(mc, ted), SiLU(), Linear(ted, ted)])
        self.label_emb = Sequential([Sequential([
            Linear(cfg.adm_in_channels, ted), SiLU(), Linear(ted, ted)])])

        blocks = [TimestepEmbedSequential([Conv2d(cfg.in_channels, mc, 3, padding=1)])]
        skip_channels = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, groups)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != last:
                blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(blocks)

        self.middle_block = TimestepEmbedSequential([
            ResBlock(ch, ted, ch, groups), transformer(ch, cfg.transformer_depth_middle),
            ResBlock(ch, ted, ch, groups)])

        blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mult * mc, groups)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)

        self.out = Sequential([GroupNorm(groups, ch, RESBLOCK_NORM_EPS), SiLU(),
                               Conv2d(mc, cfg.out_channels, 3, padding=1)])

    def construct(self, x, timesteps, context, y):
        """x (B,4,h,w), timesteps (B,) float, context (B,77,ctx), y (B,adm) -> eps (B,4,h,w)."""
        return run_model(self, self.forward, x, timesteps, context, y)

    def forward(self, x, timesteps, context, y):
        p = self  # the network's own weights (sdxl_ms.nn.module)
        t_emb = _cast(self.time_proj(p, timesteps), self.dtype)
        emb = (self.time_embed(p, t_emb)
               + self.label_emb(p, _cast(y, self.dtype)))
        context = _cast(context, self.dtype)
        h = _cast(x, self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(p, h, emb, context)
            skips.append(h)
        h = self.middle_block(p, h, emb, context)
        for i, block in enumerate(self.output_blocks):
            skip = skips[len(skips) - 1 - i]
            h = block(p, ops.cat([h, skip], axis=1), emb, context)
        return self.out(p, h)


def _cast(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)
