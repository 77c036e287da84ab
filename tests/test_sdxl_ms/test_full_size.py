"""Full-size SDXL-base (2,567M-parameter UNet): marked slow, run with `pytest -m slow`."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_sdxl_base_unet_step_at_256():
    """Instantiate the whole sdxl-base port (seeded random weights) and run one CFG UNet step."""
    from sdxl_ms import random_pipeline

    pipe = random_pipeline("sdxl-base", seed=0)
    assert sum(int(np.prod(p.shape)) for p in pipe.model.unet.get_parameters()) == 2_567_463_684
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    ehs = rng.standard_normal((2, 77, 2048)).astype(np.float32)
    pooled = rng.standard_normal((2, 1280)).astype(np.float32)
    tids = np.array([[256, 256, 0, 0, 256, 256]] * 2, np.float32)
    eps = pipe.unet(sample, np.float32(951.0), ehs, pooled, tids)
    assert eps.shape == sample.shape and np.isfinite(eps).all() and eps.std() > 1e-3
