"""Typed configs and the three presets (`tiny`, `small`, `sdxl-base`).

Every network is built from these dataclasses with plain constructors; the same objects are
mapped to diffusers/transformers configs in `sdxl_ms.weights.diffusers_configs`, so a preset is
defined exactly once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Tuple


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer (CLIP-L in Hugging Face layout, or OpenCLIP-bigG)."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: str  # "quick_gelu" (CLIP-L) or "gelu" (erf GELU, OpenCLIP-bigG)
    pad_token: str  # "<|endoftext|>" (CLIP-L) or "!" (bigG, id 0)
    projection_dim: Optional[int] = None  # bigG: pooled output projection
    vocab_size: int = 49408
    max_length: int = 77
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown text activation {self.activation!r}")
        if self.width % self.heads:
            raise ValueError("text width must be divisible by heads")


@dataclass(frozen=True)
class ConditionerConfig:
    """sgm `GeneralConditioner`: CLIP-L, OpenCLIP-bigG and three size/crop embedders."""

    clip_l: TextEncoderConfig
    clip_g: TextEncoderConfig
    size_embed_dim: int = 256  # ConcatTimestepEmbedderND(outdim=...)

    @property
    def context_dim(self) -> int:
        return self.clip_l.width + self.clip_g.width

    @property
    def pooled_dim(self) -> int:
        return self.clip_g.projection_dim

    @property
    def vector_dim(self) -> int:
        # pooled + (original_size, crop_coords_top_left, target_size), two scalars each
        return self.pooled_dim + 6 * self.size_embed_dim


@dataclass(frozen=True)
class UNetConfig:
    """sgm `UNetModel` as configured for SDXL (linear transformer projections, `adm` vector)."""

    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: Tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816
    in_channels: int = 4
    out_channels: int = 4
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels


@dataclass(frozen=True)
class VAEConfig:
    """ldm/sgm `AutoencoderKL` (encoder and decoder)."""

    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.13025
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class SDXLConfig:
    name: str
    conditioner: ConditionerConfig
    unet: UNetConfig
    vae: VAEConfig
    default_size: int = 1024
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.unet.context_dim != self.conditioner.context_dim:
            raise ValueError("unet.context_dim must equal clip_l.width + clip_g.width")
        if self.unet.adm_in_channels != self.conditioner.vector_dim:
            raise ValueError("unet.adm_in_channels must equal pooled + 6 * size_embed_dim")

    def to_dict(self) -> dict:
        return asdict(self)


SDXL_BASE = SDXLConfig(
    name="sdxl-base",
    conditioner=ConditionerConfig(
        clip_l=TextEncoderConfig(width=768, layers=12, heads=12, mlp_width=3072,
                                 activation="quick_gelu", pad_token="<|endoftext|>"),
        clip_g=TextEncoderConfig(width=1280, layers=32, heads=20, mlp_width=5120,
                                 activation="gelu", pad_token="!", projection_dim=1280),
        size_embed_dim=256,
    ),
    unet=UNetConfig(),
    vae=VAEConfig(),
    default_size=1024,
)

# The SDXL structure at toy width: every block type present (plain and cross-attention levels,
# a deeper transformer stack, down/up sampling, skip concatenations with channel changes).
TINY = SDXLConfig(
    name="tiny",
    conditioner=ConditionerConfig(
        clip_l=TextEncoderConfig(width=32, layers=3, heads=2, mlp_width=64,
                                 activation="quick_gelu", pad_token="<|endoftext|>"),
        clip_g=TextEncoderConfig(width=64, layers=3, heads=4, mlp_width=128,
                                 activation="gelu", pad_token="!", projection_dim=64),
        size_embed_dim=32,
    ),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                    transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                    num_head_channels=16, context_dim=96, adm_in_channels=64 + 6 * 32),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2),
    default_size=64,
)

# SDXL-base's numerics at a fraction of its cost: every width a module's rounding depends on is
# SDXL-base's (head dim 64; UNet levels of 320 and 640 channels in 32-group GroupNorms, their
# time MLP 1280 wide; CLIP-L 768 and bigG 1280 wide, context 2048, the size embedders' 256; the
# VAE's 128/256/512/512 channels), with fewer of them: two UNet levels, one transformer per
# attention level, three layers per text encoder, one ResBlock per VAE level.
SMALL = replace(
    SDXL_BASE, name="small", default_size=256,
    conditioner=replace(SDXL_BASE.conditioner,
                        clip_l=replace(SDXL_BASE.conditioner.clip_l, layers=3),
                        clip_g=replace(SDXL_BASE.conditioner.clip_g, layers=3)),
    unet=replace(SDXL_BASE.unet, channel_mult=(1, 2), transformer_depth=(0, 1),
                 transformer_depth_middle=1),
    vae=replace(SDXL_BASE.vae, num_res_blocks=1),
)

PRESETS = {"tiny": TINY, "small": SMALL, "sdxl-base": SDXL_BASE}


def get_preset(name: str) -> SDXLConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
