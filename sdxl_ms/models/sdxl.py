"""The whole SDXL model with sgm's top-level names (`model.diffusion_model`, `conditioner`,
`first_stage_model`), so its parameter names are the single-file checkpoint's names."""
from __future__ import annotations

from typing import Dict, Tuple

from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from ..config import SDXLConfig
from .autoencoder import AutoencoderKL
from .conditioner import GeneralConditioner
from .unet import UNetModel


class DiffusionWrapper(nn.Cell):
    """sgm's OpenAIWrapper: only here so the UNet lives under `model.diffusion_model`."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class SDXL(nn.Cell):
    def __init__(self, cfg: SDXLConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.conditioner = GeneralConditioner(cfg.conditioner)
        self.first_stage_model = AutoencoderKL(cfg.vae)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def dtype(self):
        """The dtype the model was cast to (`sdxl_ms.nn.precision.cast`)."""
        return self.unet.dtype


def build_sdxl(cfg: SDXLConfig) -> SDXL:
    """Build in float32 with parameters left unallocated: the loader or `randomize` fills each
    one once, so a full-size model never holds a throw-away initialisation beside its weights.
    `precision.cast` it before filling to load in another dtype."""
    with no_init_parameters():
        return SDXL(cfg)


def sgm_layout(cfg: SDXLConfig) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes the port expects, in module-tree order, without allocating weights."""
    return {name: tuple(p.shape) for name, p in build_sdxl(cfg).parameters_and_names()}
