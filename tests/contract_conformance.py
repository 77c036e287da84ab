"""The stage contract's meaning, as one test class that every side runs: the built-in port, the
diffusers reference and any adapter or outside port (a subclass supplies the `port` fixture).

`parity.contract.output_problems` checks names, shapes and dtypes; these tests check what the
values mean where the contract fixes it (SDXL's zeroed negatives, the size and crop
conditioning, CLIP's special tokens, one timestep for the batch, CFG, the sampler's calls), so a
side that returns the right shapes with the wrong semantics fails here, before any parity run.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO_ROOT
from parity.contract import (MAX_TOKENS, SamplerRun, StageContract, cfg_batch, output_problems,
                             signature_problems)

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"
BOS, EOS = 49406, 49407  # CLIP's start and end tokens, both tokenizers


class ContractConformance:
    """Subclasses define a fixture `port` (an object offering the contract)."""

    size = (64, 64)

    def encode(self, port, negative, original=None, crop=(0, 0)):
        return port.encode_prompt("a red cube", negative, original_size=original or self.size,
                                  crops_coords_top_left=crop, target_size=self.size)

    def test_the_methods_and_their_outputs_are_the_contracts(self, port):
        assert isinstance(port, StageContract)
        assert signature_problems(port) == []
        assert output_problems(port, *self.size) == []

    def test_token_rows_start_with_bos_and_hold_eos(self, port):
        ids = port.tokenize(["a red cube", "blurry"])
        for key in ("input_ids", "input_ids_2"):
            rows = np.asarray(ids[key])
            assert rows.shape == (2, MAX_TOKENS)
            assert (rows[:, 0] == BOS).all(), key
            assert all(EOS in row for row in rows), key
            assert not np.array_equal(rows[0], rows[1]), key

    def test_no_negative_is_zeros_and_an_empty_one_is_encoded(self, port):
        none, empty = self.encode(port, None), self.encode(port, "")
        for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            assert not np.any(none[key]), key
            assert np.any(empty[key]), key
        np.testing.assert_allclose(none["prompt_embeds"], empty["prompt_embeds"], rtol=0,
                                   atol=1e-6 * float(np.abs(none["prompt_embeds"]).max()))

    def test_time_ids_are_the_size_and_crop_conditioning(self, port):
        cond = self.encode(port, "blurry", original=(48, 80), crop=(8, 16))
        want = [[48, 80, 8, 16, *self.size]]
        assert np.asarray(cond["add_time_ids"]).tolist() == want
        assert np.asarray(cond["negative_add_time_ids"]).tolist() == want

    def test_one_timestep_is_the_same_for_every_row_of_the_batch(self, port):
        batch = cfg_batch(self.encode(port, "blurry"))
        h, w = self.size[0] // 8, self.size[1] // 8
        x = np.random.default_rng(1).standard_normal((2, 4, h, w)).astype(np.float32)
        scalar = np.asarray(port.unet(x, 500.0, **batch))
        rows = np.asarray(port.unet(x, np.array([500.0, 500.0], np.float32), **batch))
        np.testing.assert_allclose(rows, scalar, rtol=0, atol=1e-5 * float(np.abs(scalar).max()))
        assert not np.allclose(scalar[0], scalar[1])  # uncond and cond rows differ



class SamplingConformance:
    """For a side with its own `guide` and `sample` (`SamplingContract`); the reference's
    sampling is diffusers' pipeline loop, recorded, not a contract method."""

    def test_guide_is_classifier_free_guidance_uncond_first(self, port):
        eps = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
        want = eps[:1] + np.float32(5.0) * (eps[1:] - eps[:1])
        np.testing.assert_allclose(port.guide(eps, 5.0), want, rtol=1e-6, atol=1e-6)

    def test_sample_calls_the_network_on_the_cfg_batch_and_reports_each_step(self, port):
        from parity.recording import Recording
        from parity.stages import sampler_run

        run: SamplerRun = sampler_run(Recording.load(GOLDEN), "euler")
        calls, steps = [], []

        def eps(x_in, t):
            calls.append((np.shape(x_in), float(np.asarray(t).reshape(-1)[0])))
            return np.zeros(np.shape(x_in), np.float32)

        final = port.sample(run, eps, lambda i, x: steps.append((i, np.shape(x))))
        batch = (2 * run.initial_noise.shape[0],) + run.initial_noise.shape[1:]
        assert [shape for shape, _ in calls] == [batch] * run.steps
        assert [t for _, t in calls] == pytest.approx([float(t) for t in run.timesteps],
                                                      abs=1e-3)
        assert steps == [(i, run.initial_noise.shape) for i in range(run.steps)]
        assert np.shape(final) == run.initial_noise.shape
