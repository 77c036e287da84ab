"""ldm/sgm `AutoencoderKL` under `first_stage_model`: encoder, decoder, quant convs.

The encoder is built so the checkpoint loads with no unexpected keys; the contract only
decodes. All GroupNorms use eps 1e-6 (ldm `Normalize`, diffusers' VAE alike). The VAE always
computes in float32: SDXL's VAE overflows in float16 activations, and diffusers upcasts it
(`force_upcast`), so a float16 run decodes with the float16-rounded weights held in float32.
"""
from __future__ import annotations

import math

from mindspore import nn, ops

from .config import VAEConfig
from .layers import F16, F32, GroupNorm, Upsample, conv, silu

EPS = 1e-6


class ResnetBlock(nn.Cell):
    def __init__(self, groups: int, cin: int, cout: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, EPS)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(groups, cout, EPS)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.has_shortcut = cin != cout
        if self.has_shortcut:
            self.nin_shortcut = conv(cin, cout, 1)

    def construct(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.has_shortcut else x) + h


class AttnBlock(nn.Cell):
    """One-head self-attention over the H*W positions, q/k/v/proj_out 1x1 convs.
    `dtype=F16` is the defect: the block computes in float16 (input, weights, softmax), as a
    port waiting for a float16 attention kernel would."""

    def __init__(self, groups: int, channels: int, dtype=F32):
        super().__init__()
        self.compute_dtype = dtype
        self.norm = GroupNorm(groups, channels, EPS)
        self.q = conv(channels, channels, 1)
        self.k = conv(channels, channels, 1)
        self.v = conv(channels, channels, 1)
        self.proj_out = conv(channels, channels, 1)

    def _conv(self, layer, x):
        if self.compute_dtype == F32:
            return layer(x)
        return ops.bias_add(ops.conv2d(x, layer.weight.astype(self.compute_dtype)),
                            layer.bias.astype(self.compute_dtype))

    def construct(self, x):
        b, c, h, w = x.shape
        n = self.norm(x).astype(self.compute_dtype)
        q = self._conv(self.q, n).reshape(b, c, h * w).transpose(0, 2, 1)  # (B, HW, C)
        k = self._conv(self.k, n).reshape(b, c, h * w)  # (B, C, HW)
        v = self._conv(self.v, n).reshape(b, c, h * w)
        scores = ops.matmul(q, k) * (1.0 / math.sqrt(c))
        probs = ops.softmax(scores.astype(self.compute_dtype), axis=-1)
        out = ops.matmul(v, probs.transpose(0, 2, 1)).reshape(b, c, h, w)  # (B, C, HW)
        return x + self._conv(self.proj_out, out).astype(x.dtype)


class Downsample(nn.Cell):
    """ldm's asymmetric pad (right and bottom by one), then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Level(nn.Cell):
    """`down.i` / `up.i`: res blocks, then the resampler where there is one."""

    def __init__(self, blocks, resample_name: str = "", resample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        if self.resample_name:
            x = getattr(self, self.resample_name)(x)
        return x


class Mid(nn.Cell):
    def __init__(self, groups: int, channels: int, attn_dtype=F32):
        super().__init__()
        self.block_1 = ResnetBlock(groups, channels, channels)
        self.attn_1 = AttnBlock(groups, channels, attn_dtype)
        self.block_2 = ResnetBlock(groups, channels, channels)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.groups
        self.conv_in = conv(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, cin = [], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            blocks = [ResnetBlock(g, cin if j == 0 else cout, cout)
                      for j in range(cfg.num_res_blocks)]
            cin = cout
            last = i == len(cfg.ch_mult) - 1
            levels.append(Level(blocks) if last else Level(blocks, "downsample", Downsample(cin)))
        self.down = nn.CellList(levels)
        self.mid = Mid(g, cin)
        self.norm_out = GroupNorm(g, cin, EPS)
        self.conv_out = conv(cin, 2 * cfg.z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(silu(self.norm_out(self.mid(h))))


class Decoder(nn.Cell):
    def __init__(self, cfg: VAEConfig, attn_dtype=F32):
        super().__init__()
        g = cfg.groups
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(g, cin, attn_dtype)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(g, cin if j == 0 else cout, cout)
                      for j in range(cfg.num_res_blocks + 1)]
            cin = cout
            levels.append(Level(blocks, "upsample", Upsample(cin)) if i else Level(blocks))
        self.up = nn.CellList(levels[::-1])  # up.0 is the full-resolution level, run last
        self.norm_out = GroupNorm(g, cin, EPS)
        self.conv_out = conv(cin, cfg.out_ch, 3, padding=1)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    def __init__(self, cfg: VAEConfig, fp16_attention: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, F16 if fp16_attention else F32)
        self.quant_conv = conv(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = conv(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """Image in [-1, 1] -> Gaussian moments (mean, logvar stacked on channels)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z):
        """Latents already divided by the scale factor -> image (B, 3, H, W), unclipped."""
        return self.decoder(self.post_quant_conv(z))

    def construct(self, z):
        return self.decode(z)
