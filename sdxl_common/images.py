"""Float images to 8 bits, one rounding for the port's output files and the harness's image
stage."""
from __future__ import annotations

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0,1] float images -> uint8, rounding as diffusers does (x255, not the tutorial's 225)."""
    return (np.asarray(images) * 255).round().astype(np.uint8)
