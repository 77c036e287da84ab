"""sgm's `UNetModel` as SDXL uses it, in MindSpore, with sgm's module tree and parameter names.

input_blocks / middle_block / output_blocks are lists of `TimestepEmbedSequential` holding
`ResBlock`, `SpatialTransformer` (linear projections), `Downsample` (`op`) and `Upsample` (`conv`).
The time embedding plus the `label_emb` of the conditioner's vector condition every ResBlock.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..backend import run_graph, run_model
from ..config import UNetConfig
from ..nn.layers import (Conv2d, GroupNorm, Identity, LayerNorm, Linear, SiLU,
                         attention_t, conv2d, gelu, group_norm, layer_norm, linear, linear_from_t,
                         linear_t, silu, timestep_embedding, Upsample, weights_of)


TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm in front of the spatial transformer
RESBLOCK_NORM_EPS = 1e-5
LAYER_NORM_EPS = 1e-5

# Each block's forward is a function of its inputs and weights (`_resblock`,
# `_transformer_block`, ...), so that with `backend.set_jit(True)` one compiled graph serves
# every layer of the same shapes; the Cells only gather their weights.


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
        norm1, conv1, lin = self.in_layers[0], self.in_layers[2], self.emb_layers[1]
        norm2, conv2, skip = self.out_layers[0], self.out_layers[3], self.skip_connection
        params = [norm1.weight, norm1.bias, conv1.weight, conv1.bias, lin.weight, lin.bias,
                  norm2.weight, norm2.bias, conv2.weight, conv2.bias]
        if isinstance(skip, Conv2d):
            params += [skip.weight, skip.bias]
        return run_graph(_resblock, x, emb, weights_of(self, params),
                         (norm1.num_groups, norm1.eps, norm2.num_groups, norm2.eps))


def _resblock(x, emb, w, norms):
    """norm-SiLU-conv, + time embedding, norm-SiLU-conv, + skip (1x1 conv when w has 12);
    norms = (groups, eps) of the two GroupNorms."""
    # the time embedding joins conv1's bias: one BiasAdd over the (1, B*C) view
    bias = ops.bias_add(linear(silu(emb), w[4], w[5]), w[3]).reshape(-1)
    h = conv2d(silu(group_norm(x, norms[0], w[0], w[1], norms[1])), w[2], bias, 1, 1)
    h = conv2d(silu(group_norm(h, norms[2], w[6], w[7], norms[3])), w[8], w[9], 1, 1)
    return (conv2d(x, w[10], w[11]) if len(w) == 12 else x) + h


class CrossAttention(nn.Cell):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dtype):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False, dtype=dtype)
        self.to_k = Linear(context_dim, inner, bias=False, dtype=dtype)
        self.to_v = Linear(context_dim, inner, bias=False, dtype=dtype)
        self.to_out = nn.SequentialCell([Linear(inner, query_dim, dtype=dtype), Identity()])

    def weights(self):
        """Weights only: the forward is `_attention`, inside `_transformer_block`."""
        return [self.to_q.weight, self.to_k.weight, self.to_v.weight, self.to_out[0].weight,
                self.to_out[0].bias]


def _attention(x, ctx, w, batch: int, heads: int):
    """Row-major tokens (B*L, C) -> (B*L, C); w = (to_q, to_k, to_v, to_out weight, bias)."""
    return linear_from_t(attention_t(x, ctx, batch, heads, w[0], w[1], w[2]), w[3], w[4])


class GEGLU(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int, dtype):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2, dtype=dtype)


class FeedForward(nn.Cell):
    def __init__(self, dim: int, dtype, mult: int = 4):
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, dim * mult, dtype), Identity(),
                                      Linear(dim * mult, dim, dtype=dtype)])

    def weights(self):
        """Weights only: the forward is `_feed_forward`, inside `_transformer_block`."""
        proj, out = self.net[0].proj, self.net[2]
        return [proj.weight, proj.bias, out.weight, out.bias]


def _feed_forward(x, w):
    """GEGLU feed-forward on row-major tokens, the GEGLU in transposed layout: its two halves
    are then row blocks, not strided column halves (a strided view costs a slow copy)."""
    y_t = linear_t(x, w[0], w[1])
    inner = y_t.shape[0] // 2
    return linear_from_t(y_t[:inner] * gelu(y_t[inner:]), w[2], w[3])


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dtype):
        super().__init__()
        self.heads = heads
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, dtype)
        self.ff = FeedForward(dim, dtype)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dtype)
        self.norm1 = LayerNorm(dim, LAYER_NORM_EPS, dtype)
        self.norm2 = LayerNorm(dim, LAYER_NORM_EPS, dtype)
        self.norm3 = LayerNorm(dim, LAYER_NORM_EPS, dtype)

    def weights(self) -> tuple:
        return weights_of(self, [self.norm1.weight, self.norm1.bias] + self.attn1.weights()
                          + [self.norm2.weight, self.norm2.bias] + self.attn2.weights()
                          + [self.norm3.weight, self.norm3.bias] + self.ff.weights())

    def construct(self, x, context):
        b, length, dim = x.shape
        out = run_graph(_transformer_block, x.reshape(b * length, dim),
                        context.reshape(-1, context.shape[-1]), self.weights(), b, self.heads,
                        self.eps())
        return out.reshape(b, length, dim)

    def eps(self) -> tuple:
        return self.norm1.eps, self.norm2.eps, self.norm3.eps


def _transformer_block(x, ctx, w, batch: int, heads: int, eps):
    """Row-major tokens x (B*L, C), context (B*Lk, Cc) -> (B*L, C); eps of the 3 LayerNorms."""
    x = _attention(layer_norm(x, w[0], w[1], eps[0]), None, w[2:7], batch, heads) + x
    x = _attention(layer_norm(x, w[7], w[8], eps[1]), ctx, w[9:14], batch, heads) + x
    return _feed_forward(layer_norm(x, w[14], w[15], eps[2]), w[16:20]) + x


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
        params = [self.norm.weight, self.norm.bias, self.proj_in.weight, self.proj_in.bias,
                  self.proj_out.weight, self.proj_out.bias]
        blocks = self.transformer_blocks
        return run_graph(_spatial_transformer, x, context.reshape(-1, context.shape[-1]),
                         weights_of(self, params), tuple(block.weights() for block in blocks),
                         (self.norm.num_groups, self.norm.eps), blocks[0].heads,
                         tuple(block.eps() for block in blocks))


def _spatial_transformer(x, ctx, w, blocks, norm, heads: int, eps):
    """GroupNorm, proj_in to row-major tokens, the transformer blocks, proj_out, + x; one graph
    for the whole stack (*measured*: a graph call costs ~0.5 ms of dispatch on CPU)."""
    t = _tokens_in(x, w[:4], norm)
    for i, wb in enumerate(blocks):
        t = _transformer_block(t, ctx, wb, x.shape[0], heads, eps[i])
    return _tokens_out(t, x, w[4:])


def _tokens_in(x, w, norm):
    """GroupNorm (norm = (groups, eps)), then NCHW -> row-major tokens (B*HW, inner) through
    proj_in: the transpose is a MatMul flag, one image at a time."""
    b, c, h, wd = x.shape
    n = group_norm(x, norm[0], w[0], w[1], norm[1]).reshape(b, c, h * wd)
    return ops.bias_add(ops.cat([linear_from_t(n[i], w[2]) for i in range(b)], axis=0), w[3])


def _tokens_out(t, x, w):
    """proj_out back to NCHW (transpose as a MatMul flag), plus the residual x."""
    b, c, h, wd = x.shape
    length = h * wd
    y = ops.stack([linear_t(t[i * length:(i + 1) * length], w[0]) for i in range(b)])
    return ops.bias_add(y, w[1]).reshape(b, c, h, wd) + x


class Downsample(nn.Cell):
    def __init__(self, channels: int, dtype):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype)

    def construct(self, x):
        return self.op(x)


class TimestepEmbedSequential(nn.CellList):
    """Runs its layers in order, handing each the inputs its type needs."""

    def construct(self, x, emb, context):
        return _run_block(self, x, emb, context)


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
        return run_model(self, self._forward, x, timesteps, context, y)

    def _forward(self, x, timesteps, context, y):
        t_emb = _cast(timestep_embedding(timesteps, self.cfg.model_channels), self.dtype)
        t1, t2 = self.time_embed[0], self.time_embed[2]
        l1, l2 = self.label_emb[0][0], self.label_emb[0][2]
        emb = run_graph(_embedding, t_emb, _cast(y, self.dtype), weights_of(self, [
            t1.weight, t1.bias, t2.weight, t2.bias, l1.weight, l1.bias, l2.weight, l2.bias]))
        context = _cast(context, self.dtype)
        h = _cast(x, self.dtype)
        skips = []
        for block in self.input_blocks:
            h = _run_block(block, h, emb, context)
            skips.append(h)
        h = _run_block(self.middle_block, h, emb, context)
        for i, block in enumerate(self.output_blocks):
            h = _run_block(block, ops.cat([h, skips[len(skips) - 1 - i]], axis=1), emb, context)
        return self.out(h)


def _cast(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


def _embedding(t_emb, y, w):
    """time_embed(t_emb) + label_emb(y): two Linear-SiLU-Linear stacks."""
    return (linear(silu(linear(t_emb, w[0], w[1])), w[2], w[3])
            + linear(silu(linear(y, w[4], w[5])), w[6], w[7]))


def _run_block(block, x, emb, context):
    """`TimestepEmbedSequential` inlined: graph mode (ms.jit) cannot call a CellList."""
    for layer in block:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context)
        else:
            x = layer(x)
    return x
