"""MindSpore SDXL-base-1.0 in sgm's structure: conditioner, UNet, VAE, EDM samplers, pipeline.

Never imports torch. Heavy modules load on first use: `sdxl_ms.load_pipeline(path)`.
"""
from .config import PRESETS, SDXLConfig, get_preset

__version__ = "0.1.0"
__all__ = ["PRESETS", "SDXLConfig", "get_preset", "load_pipeline", "random_pipeline",
           "SDXLPipeline"]


def __getattr__(name):
    if name in ("load_pipeline", "random_pipeline", "SDXLPipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdxl_ms' has no attribute {name!r}")
