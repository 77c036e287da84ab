"""The tiny preset's shapes, copied from `sdxl_ms/config.py` (TINY) into this port's own
config, so the port owns its numbers; `Shapes.check` compares them with the checkpoint's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class TextConfig:
    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: str  # "quick_gelu" (CLIP-L) or "gelu" (erf, bigG)
    pad_token: str  # CLIP-L pads with <|endoftext|>, bigG with "!" (id 0)
    projection_dim: int = 0
    vocab_size: int = 49408
    max_length: int = 77
    eps: float = 1e-5


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    transformer_depth: Tuple[int, ...] = (0, 1, 2)
    transformer_depth_middle: int = 2
    num_head_channels: int = 16
    context_dim: int = 96
    adm_in_channels: int = 64 + 6 * 32
    in_channels: int = 4
    out_channels: int = 4
    groups: int = 32


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 32
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.13025
    groups: int = 32


@dataclass(frozen=True)
class TinyConfig:
    clip_l: TextConfig = TextConfig(32, 3, 2, 64, "quick_gelu", "<|endoftext|>")
    clip_g: TextConfig = TextConfig(64, 3, 4, 128, "gelu", "!", projection_dim=64)
    size_embed_dim: int = 32
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    default_size: int = 64


TINY = TinyConfig()
