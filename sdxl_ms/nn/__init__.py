"""Building blocks with PyTorch parameter names (`weight`/`bias`) and explicit epsilons."""
from .layers import (Conv2d, Embedding, GroupNorm, Identity, LayerNorm, Linear, SiLU, Upsample,
                     gelu, quick_gelu, silu, timestep_embedding, upsample_nearest2x)
from .precision import cast

__all__ = ["Conv2d", "Embedding", "GroupNorm", "Identity", "LayerNorm", "Linear", "SiLU", "Upsample",
           "cast", "gelu", "quick_gelu", "silu", "timestep_embedding", "upsample_nearest2x"]
