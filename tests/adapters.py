"""Ports as a porting engineer plugs them in (`sdxl-parity run --port tests/adapters.py:NAME`).

`OwnLoopPort` stands for a port written elsewhere: it takes its networks from a MindSpore SDXL
(here the built-in one, loaded from the checkpoint) and brings its own sampler loop, written
independently in plain numpy (k-diffusion's Euler and Euler-ancestral steps on the reference's
sigmas), so the sampler and trajectory stages test that loop, not sdxl_ms's. The broken
variants each carry one bug that must fail at its own stage.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from sdxl_ms import load_pipeline


class NetworksPort:
    """Only the four stage methods, delegated to a MindSpore SDXL: the harness falls back to
    the built-in sampler and the reference's CFG, and says so."""

    version = "adapter-1.0"

    def __init__(self, checkpoint, dtype: str):
        self.pipe = load_pipeline(checkpoint, dtype=dtype)

    def tokenize(self, prompts):
        return self.pipe.tokenize(prompts)

    def encode_prompt(self, prompt, negative_prompt=None, *, original_size, crops_coords_top_left,
                      target_size):
        return self.pipe.encode_prompt(prompt, negative_prompt, original_size=original_size,
                                       crops_coords_top_left=crops_coords_top_left,
                                       target_size=target_size)

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.pipe.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)

    def decode(self, latents):
        return self.pipe.decode(latents)


class OwnLoopPort(NetworksPort):
    """The stage contract plus its own `guide` and `sample` loop."""

    def guide(self, eps, scale):
        uncond, cond = np.split(np.asarray(eps, np.float32), 2)
        return uncond + np.float32(scale) * (cond - uncond)

    def sample(self, run, eps: Callable, callback: Callable) -> np.ndarray:
        """Euler / Euler-ancestral on the reference's own grid (run.sigmas, run.timesteps)."""
        if run.sampler not in ("euler", "euler_a"):
            raise NotImplementedError(f"this adapter's loop has no {run.sampler!r}")
        sigmas = np.asarray(run.sigmas, np.float64)
        x = np.asarray(run.initial_noise, np.float32) * np.float32(run.init_noise_sigma)
        for i in range(len(run.timesteps)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x_in = self.model_input(x, sigma)
            guided = self.guide(eps(np.concatenate([x_in, x_in]), self.timestep(run, i)),
                                run.guidance)
            derivative = guided  # d = (x - x0) / sigma with x0 = x - sigma * eps
            if run.sampler == "euler":
                x = self.step(x, derivative, sigma_next - sigma)
            else:
                up = np.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
                down = np.sqrt(sigma_next ** 2 - up ** 2)
                x = self.step(x, derivative, down - sigma) + np.float32(up) * run.step_noise[i]
            x = x.astype(np.float32)
            callback(i, x)
        return x

    @staticmethod
    def step(x, derivative, dt):
        return x + derivative * np.float32(dt)

    def model_input(self, x, sigma):
        """c_in: the UNet's input scaling for a variance-exploding x."""
        return (x / np.sqrt(sigma ** 2 + 1)).astype(np.float32)

    def timestep(self, run, i):
        return np.float32(run.timesteps[i])


class NoInputScalingPort(OwnLoopPort):
    """Bug in the port's sampler: the UNet gets x itself, not x / sqrt(sigma^2 + 1) (c_in)."""

    def model_input(self, x, sigma):
        return np.asarray(x, np.float32)


class SigmaAsTimestepPort(OwnLoopPort):
    """Bug in the port's sampler: the UNet is conditioned on sigma instead of the timestep."""

    def timestep(self, run, i):
        return np.float32(run.sigmas[i])


class TimestepOffByOnePort(OwnLoopPort):
    """Bug in the port's sampler: the timestep of the next grid point (off by one index)."""

    def timestep(self, run, i):
        return np.float32(run.timesteps[min(i + 1, len(run.timesteps) - 1)])


class SD1ScaleDecodePort(OwnLoopPort):
    """Bug: decodes with SD 1.x's latent scale (0.18215) instead of SDXL's 0.13025."""

    def decode(self, latents):
        return self.pipe.decode(np.asarray(latents, np.float32) * np.float32(0.13025 / 0.18215))


class HalfStepSamplerPort(OwnLoopPort):
    """Bug in the port's own sampler: every Euler step goes half the way."""

    @staticmethod
    def step(x, derivative, dt):
        return x + derivative * np.float32(dt / 2)


def raising_cross_attention(checkpoint, dtype):
    """The built-in port (its cells() included) with one transformer block's cross-attention
    given no context: its keys come from x, whose width is not the context's, so the MatMul
    raises (a ValueError from MindSpore) in the stage and in localisation alike."""
    import types

    from sdxl_ms.nn.layers import attention_t

    pipe = load_pipeline(checkpoint, dtype=dtype)
    attn = pipe.model.unet.input_blocks[4][1].transformer_blocks[0].attn2

    def forward(self, p, x, context, batch):
        heads_t = attention_t(x, x, batch, self.heads, p["to_q"]["weight"],
                              p["to_k"]["weight"], p["to_v"]["weight"])
        return self.to_out[0].from_transposed(p, heads_t)

    attn.forward = types.MethodType(forward, attn)
    return pipe


def float16_decoder_attention(checkpoint, dtype):
    """The built-in port whose VAE mid-block attention computes in float16 (a port waiting for
    a fused float16 attention kernel): `decode` moves by ~1e-4..1e-3, nothing else."""
    import types

    import mindspore as ms
    from mindspore import ops

    from sdxl_ms.nn.layers import attention_heads_t

    pipe = load_pipeline(checkpoint, dtype=dtype)
    attn = pipe.decoding_vae().decoder.mid.attn_1

    def forward(self, p, x):
        b, c, h, w = x.shape
        n = self.norm(p, x)
        q, k, v = (getattr(self, name)(p, n).reshape(b, c, h * w).astype(ms.float16)
                   for name in ("q", "k", "v"))
        out = ops.stack([attention_heads_t(q[i], k[i], v[i], 1) for i in range(b)])
        return x + self.proj_out(p, out.astype(x.dtype).reshape(b, c, h, w))

    attn.forward = types.MethodType(forward, attn)
    return pipe


# factories (checkpoint, dtype) -> port: a class is one
faithful = OwnLoopPort
sd1_scale_decode = SD1ScaleDecodePort
half_step_sampler = HalfStepSamplerPort
networks_only = NetworksPort
no_input_scaling = NoInputScalingPort
sigma_as_timestep = SigmaAsTimestepPort
timestep_off_by_one = TimestepOffByOnePort


class MissingDecode:
    """Not a port: it lacks decode()."""

    def __init__(self, checkpoint, dtype):
        pass

    def tokenize(self, prompts):
        return {}

    def encode_prompt(self, prompt, negative_prompt=None, *, original_size, crops_coords_top_left,
                      target_size):
        return {}

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return sample


missing_decode = MissingDecode
