"""The SDXL VAE as ldm/sgm `AutoencoderKL`, with the module tree (and so the parameter names)
of the single-file checkpoint's `first_stage_model.*` entries.

Only the inference path is built: no loss, no attention-resolution blocks inside the levels
(SDXL's VAE has `attn_resolutions=[]`), no timestep embedding in the res blocks.
"""
from __future__ import annotations

from typing import List

from mindspore import nn, ops

from ..config import VAEConfig
from ..nn.layers import Conv2d, GroupNorm, Upsample, attention_heads_t, silu
from ..nn.module import Module, Network, run_model

GROUPNORM_EPS = 1e-6  # ldm `Normalize`; diffusers' VAE uses the same


class ResnetBlock(Module):
    """norm-SiLU-conv3x3 twice, plus a 1x1 `nin_shortcut` when the width changes."""

    graph_unit = True

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = GroupNorm(cfg.norm_groups, in_channels, GROUPNORM_EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(cfg.norm_groups, out_channels, GROUPNORM_EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else None)

    def forward(self, p, x):
        h = self.conv1(p, silu(self.norm1(p, x)))
        h = self.conv2(p, silu(self.norm2(p, h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(p, x)
        return x + h


class AttnBlock(Module):
    """Single-head self-attention over the H*W positions; q/k/v/proj_out are 1x1 convs. In NCHW
    each image's q, k and v are already (C, HW), the transposed layout `attention_heads_t`
    takes, so nothing is transposed."""

    graph_unit = True

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_groups, channels, GROUPNORM_EPS)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, p, x):
        b, c, h, w = x.shape
        n = self.norm(p, x)
        q = self.q(p, n).reshape(b, c, h * w)
        k = self.k(p, n).reshape(b, c, h * w)
        v = self.v(p, n).reshape(b, c, h * w)
        out = ops.stack([attention_heads_t(q[i], k[i], v[i], 1) for i in range(b)])
        return x + self.proj_out(p, out.reshape(b, c, h, w))


class Downsample(Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (ldm's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, p, x):
        return self.conv(p, ops.pad(x, (0, 1, 0, 1)))


class Level(Module):
    """One resolution of the encoder (`down.{i}`) or decoder (`up.{i}`): res blocks + resampler."""

    def __init__(self, blocks: List[ResnetBlock], resample_name: str = "", resample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)  # `downsample` / `upsample`, as sgm names it

    def forward(self, p, x):
        for blk in self.block:
            x = blk(p, x)
        if self.resample_name:
            x = getattr(self, self.resample_name)(p, x)
        return x


class MidBlock(Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, p, x):
        x = self.block_1(p, x)
        x = self.attn_1(p, x)
        return self.block_2(p, x)


class Encoder(Module):
    """Image (B, 3, H, W) -> moments (B, 2*z, H/f, W/f) before `quant_conv`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, block_in = [], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = [ResnetBlock(cfg, block_in if j == 0 else block_out, block_out)
                      for j in range(cfg.num_res_blocks)]
            block_in = block_out
            if i != n - 1:
                levels.append(Level(blocks, "downsample", Downsample(block_in)))
            else:
                levels.append(Level(blocks))
        self.down = nn.CellList(levels)
        self.mid = MidBlock(cfg, block_in)
        self.norm_out = GroupNorm(cfg.norm_groups, block_in, GROUPNORM_EPS)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, p, x):
        h = self.conv_in(p, x)
        for level in self.down:
            h = level(p, h)
        h = self.mid(p, h)
        return self.conv_out(p, silu(self.norm_out(p, h)))


class Decoder(Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f). `up[i]` is level i, run from the deepest."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(cfg, block_in)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cfg, block_in if j == 0 else block_out, block_out)
                      for j in range(cfg.num_res_blocks + 1)]
            block_in = block_out
            if i != 0:
                levels.append(Level(blocks, "upsample", Upsample(block_in)))
            else:
                levels.append(Level(blocks))
        self.up = nn.CellList(levels[::-1])
        self.norm_out = GroupNorm(cfg.norm_groups, block_in, GROUPNORM_EPS)
        self.conv_out = Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, p, z):
        h = self.mid(p, self.conv_in(p, z))
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](p, h)
        return self.conv_out(p, silu(self.norm_out(p, h)))


class AutoencoderKL(Network):
    """sgm `AutoencoderKL` for inference: `encode` gives the Gaussian moments, `decode` the image.

    The latent scale factor (`cfg.scale_factor`, 0.13025 for SDXL) is the caller's business:
    `decode` takes latents already divided by it, `encode_mean` returns unscaled latents.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """Image in [-1, 1], (B, 3, H, W) -> moments (B, 2z, H/f, W/f): mean then raw logvar."""
        return run_model(self, self._encode, x)

    def _encode(self, x):
        p = self  # the network's own weights (sdxl_ms.nn.module)
        return self.quant_conv(p, self.encoder(p, x.astype(self.dtype)))

    def encode_mean(self, x):
        return self.encode(x)[:, :self.cfg.z_channels]

    def decode(self, z):
        """Latents already divided by the scale factor -> float image (B, 3, H, W), unclipped."""
        return run_model(self, self._decode, z)

    def _decode(self, z):
        p = self  # the network's own weights (sdxl_ms.nn.module)
        return self.decoder(p, self.post_quant_conv(p, z.astype(self.dtype)))

    def construct(self, z):
        return self.decode(z)
