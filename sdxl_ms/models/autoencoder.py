"""The SDXL VAE as ldm/sgm `AutoencoderKL`, with the module tree (and so the parameter names)
of the single-file checkpoint's `first_stage_model.*` entries.

Only the inference path is built: no loss, no attention-resolution blocks inside the levels
(SDXL's VAE has `attn_resolutions=[]`), no timestep embedding in the res blocks.
"""
from __future__ import annotations

from typing import List

import mindspore as ms
from mindspore import nn, ops

from ..config import VAEConfig
from ..backend import run_graph, run_model
from ..nn.layers import (Conv2d, GroupNorm, Upsample, attention_heads_t, conv2d, group_norm, silu,
                         weights_of)

GROUPNORM_EPS = 1e-6  # ldm `Normalize`; diffusers' VAE uses the same


class ResnetBlock(nn.Cell):
    """norm-SiLU-conv3x3 twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, dtype):
        super().__init__()
        self.norm1 = GroupNorm(cfg.norm_groups, in_channels, GROUPNORM_EPS, dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(cfg.norm_groups, out_channels, GROUPNORM_EPS, dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.nin_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype)
                             if in_channels != out_channels else None)

    def construct(self, x):
        params = [self.norm1.weight, self.norm1.bias, self.conv1.weight, self.conv1.bias,
                  self.norm2.weight, self.norm2.bias, self.conv2.weight, self.conv2.bias]
        if self.nin_shortcut is not None:
            params += [self.nin_shortcut.weight, self.nin_shortcut.bias]
        return run_graph(_resnet_block, x, weights_of(self, params),
                         (self.norm1.num_groups, self.norm1.eps, self.norm2.num_groups,
                          self.norm2.eps))


def _resnet_block(x, w, norms):
    """norms = (groups, eps) of norm1 and norm2."""
    h = conv2d(silu(group_norm(x, norms[0], w[0], w[1], norms[1])), w[2], w[3], 1, 1)
    h = conv2d(silu(group_norm(h, norms[2], w[4], w[5], norms[3])), w[6], w[7], 1, 1)
    return (conv2d(x, w[8], w[9]) if len(w) == 10 else x) + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the H*W positions; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, cfg: VAEConfig, channels: int, dtype):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_groups, channels, GROUPNORM_EPS, dtype)
        self.q = Conv2d(channels, channels, 1, dtype=dtype)
        self.k = Conv2d(channels, channels, 1, dtype=dtype)
        self.v = Conv2d(channels, channels, 1, dtype=dtype)
        self.proj_out = Conv2d(channels, channels, 1, dtype=dtype)

    def construct(self, x):
        params = [self.norm.weight, self.norm.bias]
        for conv in (self.q, self.k, self.v, self.proj_out):
            params += [conv.weight, conv.bias]
        return run_graph(_attn_block, x, weights_of(self, params),
                         (self.norm.num_groups, self.norm.eps))


def _attn_block(x, w, norm):
    """Single-head attention over H*W. In NCHW each image's q, k, v are already (C, HW): the
    transposed layout of `attention_heads_t`, so nothing is transposed."""
    b, c, h, wd = x.shape
    n = group_norm(x, norm[0], w[0], w[1], norm[1])
    q, k, v = (conv2d(n, w[i], w[i + 1]).reshape(b, c, h * wd) for i in (2, 4, 6))
    out = ops.stack([attention_heads_t(q[i], k[i], v[i], 1) for i in range(b)])
    return x + conv2d(out.reshape(b, c, h, wd), w[8], w[9])


class Downsample(nn.Cell):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (ldm's asymmetric pad)."""

    def __init__(self, channels: int, dtype):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Level(nn.Cell):
    """One resolution of the encoder (`down.{i}`) or decoder (`up.{i}`): res blocks + resampler."""

    def __init__(self, blocks: List[ResnetBlock], resample_name: str = "", resample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)  # `downsample` / `upsample`, as sgm names it

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        if self.resample_name:
            x = getattr(self, self.resample_name)(x)
        return x


class MidBlock(nn.Cell):
    def __init__(self, cfg: VAEConfig, channels: int, dtype):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels, dtype)
        self.attn_1 = AttnBlock(cfg, channels, dtype)
        self.block_2 = ResnetBlock(cfg, channels, channels, dtype)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Cell):
    """Image (B, 3, H, W) -> moments (B, 2*z, H/f, W/f) before `quant_conv`."""

    def __init__(self, cfg: VAEConfig, dtype):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, dtype=dtype)
        levels, block_in = [], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = [ResnetBlock(cfg, block_in if j == 0 else block_out, block_out, dtype)
                      for j in range(cfg.num_res_blocks)]
            block_in = block_out
            if i != n - 1:
                levels.append(Level(blocks, "downsample", Downsample(block_in, dtype)))
            else:
                levels.append(Level(blocks))
        self.down = nn.CellList(levels)
        self.mid = MidBlock(cfg, block_in, dtype)
        self.norm_out = GroupNorm(cfg.norm_groups, block_in, GROUPNORM_EPS, dtype)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Cell):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f). `up[i]` is level i, run from the deepest."""

    def __init__(self, cfg: VAEConfig, dtype):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1, dtype=dtype)
        self.mid = MidBlock(cfg, block_in, dtype)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cfg, block_in if j == 0 else block_out, block_out, dtype)
                      for j in range(cfg.num_res_blocks + 1)]
            block_in = block_out
            if i != 0:
                levels.append(Level(blocks, "upsample", Upsample(block_in, dtype)))
            else:
                levels.append(Level(blocks))
        self.up = nn.CellList(levels[::-1])
        self.norm_out = GroupNorm(cfg.norm_groups, block_in, GROUPNORM_EPS, dtype)
        self.conv_out = Conv2d(block_in, cfg.out_ch, 3, padding=1, dtype=dtype)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    """sgm `AutoencoderKL` for inference: `encode` gives the Gaussian moments, `decode` the image.

    The latent scale factor (`cfg.scale_factor`, 0.13025 for SDXL) is the caller's business:
    `decode` takes latents already divided by it, `encode_mean` returns unscaled latents.
    """

    def __init__(self, cfg: VAEConfig, dtype=ms.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.encoder = Encoder(cfg, dtype)
        self.decoder = Decoder(cfg, dtype)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1, dtype=dtype)
        self.post_quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1, dtype=dtype)

    def encode(self, x):
        """Image in [-1, 1], (B, 3, H, W) -> moments (B, 2z, H/f, W/f): mean then raw logvar."""
        return run_model(self, self._encode, x)

    def _encode(self, x):
        return self.quant_conv(self.encoder(x.astype(self.dtype)))

    def encode_mean(self, x):
        return self.encode(x)[:, :self.cfg.z_channels]

    def decode(self, z):
        """Latents already divided by the scale factor -> float image (B, 3, H, W), unclipped."""
        return run_model(self, self._decode, z)

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

    def construct(self, z):
        return self.decode(z)
