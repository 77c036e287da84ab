"""Port vs reference through the stage contract, on the tiny checkpoint in both formats (fp32).

Must-show numbers of the networks issue: relative L2 <= 1e-5 for every tensor of
`encode_prompt` (negative None and a negative prompt), `unet` at two timesteps, and `decode`;
`tokenize` identical.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_l2
from parity.reference import load_reference
from sdxl_ms import load_pipeline

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tiny_checkpoints):
    return load_reference(tiny_checkpoints["diffusers"])


@pytest.fixture(scope="module", params=["diffusers", "sgm"])
def port(request, tiny_checkpoints):
    return load_pipeline(tiny_checkpoints[request.param])


def test_tokenize_identical(port, ref):
    prompts = [PROMPT, "", "a photo of a cat " * 40]
    got, want = port.tokenize(prompts), ref.tokenize(prompts)
    assert set(got) == set(want) == {"input_ids", "input_ids_2"}
    for key in want:
        assert got[key].dtype == np.int64 and got[key].shape == (3, 77)
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("negative", [None, "", "blurry, low quality"])
def test_encode_prompt(port, ref, negative):
    kw = dict(original_size=(64, 48), crops_coords_top_left=(2, 3), target_size=(64, 64))
    got = port.encode_prompt(PROMPT, negative, **kw)
    want = ref.encode_prompt(PROMPT, negative, **kw)
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key].shape == w.shape, key
        if not np.any(w):
            np.testing.assert_array_equal(got[key], w, err_msg=key)  # zeroed negatives
        else:
            assert rel_l2(got[key], w) <= TOL, key
    if negative is None:
        assert not np.any(want["negative_prompt_embeds"])
    else:
        assert np.any(want["negative_prompt_embeds"])


@pytest.mark.parametrize("timestep", [951.0, 26.0])
def test_unet(port, ref, timestep):
    rng = np.random.default_rng(7)
    cond = ref.encode_prompt(PROMPT, "ugly")
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ehs = np.concatenate([cond["negative_prompt_embeds"], cond["prompt_embeds"]])
    pooled = np.concatenate([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]])
    tids = np.concatenate([cond["negative_add_time_ids"], cond["add_time_ids"]])
    args = (sample, np.float32(timestep), ehs, pooled, tids)
    want = ref.unet(*args)
    assert want.shape == sample.shape and want.std() > 0.1
    assert rel_l2(port.unet(*args), want) <= TOL


def test_decode(port, ref):
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    want = ref.decode(latents)
    got = port.decode(latents)
    assert got.shape == want.shape == (2, 3, 64, 64)
    assert rel_l2(got, want) <= TOL


def test_both_formats_load_identical_weights(tiny_checkpoints):
    a = load_pipeline(tiny_checkpoints["diffusers"])
    b = load_pipeline(tiny_checkpoints["sgm"])
    pa = dict(a.model.parameters_and_names())
    pb = dict(b.model.parameters_and_names())
    assert pa.keys() == pb.keys()
    worst = max(float(np.abs(pa[k].asnumpy() - pb[k].asnumpy()).max()) for k in pa)
    assert worst == 0.0
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.abs(a.decode(latents) - b.decode(latents)).max() <= 1e-6
    ea, eb = a.encode_prompt(PROMPT, "grainy"), b.encode_prompt(PROMPT, "grainy")
    assert max(float(np.abs(ea[k] - eb[k]).max()) for k in ea) <= 1e-6
    args = (latents, np.float32(500.0), ea["prompt_embeds"], ea["pooled_prompt_embeds"],
            ea["add_time_ids"])
    assert np.abs(a.unet(*args) - b.unet(*args)).max() <= 1e-6
