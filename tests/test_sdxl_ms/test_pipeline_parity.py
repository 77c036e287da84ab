"""End-to-end: the port's pipeline vs diffusers' StableDiffusionXLPipeline on the tiny checkpoint,
same latents (and the same per-step noise for ancestral sampling), 4 steps, guidance 5, fp32."""
from __future__ import annotations

import numpy as np
import pytest

from parity.reference import load_reference
from sdxl_ms import load_pipeline
from sdxl_ms.sampling import GivenNoise

PROMPT = "a watercolor fox in the snow"
NEGATIVE = "blurry"
SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def pair(tiny_checkpoints):
    path = tiny_checkpoints["diffusers"]
    return load_pipeline(path), load_reference(path)


def _latents(seed=11):
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "lms"])
def test_images_match_diffusers(pair, sampler):
    port, ref = pair
    latents = _latents()
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
              sampler=sampler, schedule="leading")
    want = ref(PROMPT, NEGATIVE, latents=latents, **kw)
    got = port(PROMPT, NEGATIVE, latents=latents, progress=False, **kw)
    assert got.shape == want.shape == (1, SIZE, SIZE, 3) and got.dtype == np.float32
    assert want.std() > 0.05  # the image is not a flat field
    diff = np.abs(got - want)
    assert diff.mean() <= 2e-4 and diff.max() <= 2e-3, (diff.mean(), diff.max())


def test_euler_ancestral_with_shared_step_noise(pair):
    port, ref = pair
    latents = _latents(12)
    rng = np.random.default_rng(99)
    step_noise = [rng.standard_normal(latents.shape).astype(np.float32) for _ in range(STEPS)]
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
              sampler="euler_a", schedule="leading")
    want = ref(PROMPT, None, latents=latents, step_noise=step_noise, **kw)
    got = port(PROMPT, None, noise=GivenNoise(latents, step_noise), progress=False, **kw)
    diff = np.abs(got - want)
    assert diff.mean() <= 2e-4 and diff.max() <= 2e-3, (diff.mean(), diff.max())
    # and the noise matters: other step noise gives a clearly different image
    other = port(PROMPT, None, noise=GivenNoise(latents, step_noise[::-1]), progress=False, **kw)
    assert np.abs(other - want).mean() > 1e-3
