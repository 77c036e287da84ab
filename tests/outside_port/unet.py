"""sgm's `UNetModel` (openaimodel.py) as SDXL configures it, under `model.diffusion_model`.

input_blocks / middle_block / output_blocks hold `TimestepEmbedSequential`s of ResBlock,
SpatialTransformer (linear proj_in/proj_out), Downsample (`op`) and Upsample (`conv`); the
sinusoidal time embedding plus `label_emb(y)` (y = pooled text + size embeddings) conditions
every ResBlock. Norm epsilons as sgm and diffusers have them: ResBlock and output GroupNorms
1e-5, the spatial transformer's GroupNorm 1e-6, the transformer blocks' LayerNorms 1e-5.
"""
from __future__ import annotations

from mindspore import nn, ops

from .config import UNetConfig
from .layers import (F32, Defects, GroupNorm, Identity, LayerNorm, SiLU, Upsample, attention,
                     conv, dense, gelu_erf, gelu_tanh, sinusoid_frequencies, timestep_embedding)

RESBLOCK_EPS = 1e-5
TRANSFORMER_GROUPNORM_EPS = 1e-6
LAYERNORM_EPS = 1e-5
# the block whose norm1 the `ln_eps_1e6` defect changes: the first transformer block
LN_DEFECT_BLOCK = "input_blocks.4.1.transformer_blocks.0"


class ResBlock(nn.Cell):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.SequentialCell([
            GroupNorm(groups, channels, RESBLOCK_EPS), SiLU(),
            conv(channels, out_channels, 3, padding=1)])
        self.emb_layers = nn.SequentialCell([SiLU(), dense(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell([
            GroupNorm(groups, out_channels, RESBLOCK_EPS), SiLU(), Identity(),  # dropout slot
            conv(out_channels, out_channels, 3, padding=1)])
        self.skip_connection = (Identity() if channels == out_channels
                                else conv(channels, out_channels, 1))

    def construct(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Cell):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int,
                 half_scores: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.half_scores = heads, half_scores
        self.to_q = dense(query_dim, inner, bias=False)
        self.to_k = dense(context_dim, inner, bias=False)
        self.to_v = dense(context_dim, inner, bias=False)
        self.to_out = nn.SequentialCell([dense(inner, query_dim), Identity()])

    def construct(self, x, context=None):
        ctx = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads,
                                     half_scores=self.half_scores))


class GEGLU(nn.Cell):
    """proj(x) -> (value, gate) halves; value * GELU(gate), erf GELU as the reference."""

    def __init__(self, dim_in: int, dim_out: int, tanh: bool = False):
        super().__init__()
        self.proj = dense(dim_in, dim_out * 2)
        self.act = gelu_tanh if tanh else gelu_erf

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return value * self.act(gate)


class FeedForward(nn.Cell):
    def __init__(self, dim: int, tanh_geglu: bool = False, mult: int = 4):
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, dim * mult, tanh_geglu), Identity(),
                                      dense(dim * mult, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int,
                 defects: Defects, norm1_eps: float = LAYERNORM_EPS):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, defects.half_scores)
        self.ff = FeedForward(dim, defects.tanh_geglu)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, defects.half_scores)
        self.norm1 = LayerNorm(dim, norm1_eps)
        self.norm2 = LayerNorm(dim, LAYERNORM_EPS)
        self.norm3 = LayerNorm(dim, LAYERNORM_EPS)

    def construct(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Cell):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 groups: int, defects: Defects, path: str):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = dense(channels, inner)
        blocks = []
        for d in range(depth):
            eps = LAYERNORM_EPS
            if defects.ln_eps_1e6 and f"{path}.transformer_blocks.{d}" == LN_DEFECT_BLOCK:
                eps = 1e-6
            blocks.append(BasicTransformerBlock(inner, heads, dim_head, context_dim, defects, eps))
        self.transformer_blocks = nn.CellList(blocks)
        self.proj_out = dense(inner, channels)

    def construct(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(0, 2, 1)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = self.proj_out(tokens).transpose(0, 2, 1).reshape(b, c, h, w)
        return out + x


class Downsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.op = conv(channels, channels, 3, stride=2, padding=1)

    def construct(self, x):
        return self.op(x)


class TimestepEmbedSequential(nn.CellList):
    """Its layers in order, each handed what its kind takes."""

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
    def __init__(self, cfg: UNetConfig, defects: Defects):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = F32
        mc = cfg.model_channels
        ted = mc * 4
        groups = cfg.groups
        self.freqs = sinusoid_frequencies(mc, exp32=defects.exp32_timestep)
        self.time_embed = nn.SequentialCell([dense(mc, ted), SiLU(), dense(ted, ted)])
        self.label_emb = nn.SequentialCell([nn.SequentialCell([
            dense(cfg.adm_in_channels, ted), SiLU(), dense(ted, ted)])])

        def transformer(ch, depth, path):
            return SpatialTransformer(ch, ch // cfg.num_head_channels, cfg.num_head_channels,
                                      depth, cfg.context_dim, groups, defects, path)

        blocks = [TimestepEmbedSequential([conv(cfg.in_channels, mc, 3, padding=1)])]
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, groups)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level],
                                              f"input_blocks.{len(blocks)}.1"))
                blocks.append(TimestepEmbedSequential(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skips.append(ch)
        self.input_blocks = nn.CellList(blocks)
        self.middle_block = TimestepEmbedSequential([
            ResBlock(ch, ted, ch, groups),
            transformer(ch, cfg.transformer_depth_middle, "middle_block.1"),
            ResBlock(ch, ted, ch, groups)])
        blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), ted, mult * mc, groups)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level],
                                              f"output_blocks.{len(blocks)}.1"))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)
        self.out = nn.SequentialCell([GroupNorm(groups, ch, RESBLOCK_EPS), SiLU(),
                                      conv(mc, cfg.out_channels, 3, padding=1)])

    def construct(self, x, timesteps, context, y):
        """x (B, 4, h, w), timesteps (B,) float32, context (B, 77, ctx), y (B, adm) -> eps.
        The sinusoid is float32 and cast to the compute dtype, as diffusers casts `t_emb`."""
        dt = self.compute_dtype
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels, self.freqs).astype(dt)
        emb = self.time_embed(t_emb) + self.label_emb(y.astype(dt))
        context = context.astype(dt)
        h = x.astype(dt)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(ops.cat([h, hs.pop()], axis=1), emb, context)
        return self.out(h)
