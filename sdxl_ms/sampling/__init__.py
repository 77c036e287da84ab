"""Samplers for SDXL in framework-neutral float32 numpy (k-diffusion style, sgm names).

How the pieces meet:

    network(x_in, t, cond) -> eps          any callable on numpy arrays (the UNet wrapper)
    Denoiser(scaling, timestep_map)        x0 = x + c_out * network(c_in * x, t)
    GuidedDenoiser(network, denoiser, guider, cond, uncond)
        __call__(x, sigma, timestep) -> x0 guided; the only thing a sampler calls
    Schedule                               sigmas (n+1), timesteps (n), init_noise_sigma
    sampler(denoise, x, schedule, noise, callback) -> x

Samplers only see denoised x0, like k-diffusion: they pass the grid timestep of each sigma (or
None off the grid, where the denoiser's `timestep_map` decides), never scale inputs, never
batch for CFG. `make_sampler(name, steps, schedule)` returns a `SamplingPlan` with the grid the
matching diffusers scheduler builds; `plan(denoise, noise, shape)` draws the starting latent
(`noise.initial * init_noise_sigma`) and runs the loop. Typical use:

    plan = make_sampler("euler", 30)
    denoise = GuidedDenoiser(unet_fn, Denoiser.for_schedule(plan.schedule), VanillaCFG(5.0),
                             cond=c, uncond=uc)
    latents = plan(denoise, SeededNoise(0), (1, 4, 128, 128))
"""
from .denoiser import Denoiser, EpsScaling
from .discretization import (LogSigmaInterp, QuantizedTimesteps, Schedule, karras_schedule, make_schedule,
                             sgm_schedule, spaced_schedule, training_sigmas)
from .guiders import GuidedDenoiser, IdentityGuider, VanillaCFG
from .noise import GivenNoise, NoiseSource, SeededNoise
from .samplers import (SAMPLERS, DPMPP2MSampler, DPMPP2SAncestralSampler, EulerAncestralSampler,
                       EulerEDMSampler, HeunEDMSampler, LinearMultistepSampler, SamplingPlan,
                       check_sampler, make_sampler, sampler_schedule)

__all__ = [
    "Denoiser", "EpsScaling", "LogSigmaInterp", "QuantizedTimesteps", "Schedule", "karras_schedule",
    "make_schedule", "sgm_schedule", "spaced_schedule", "training_sigmas", "GuidedDenoiser",
    "IdentityGuider", "VanillaCFG", "GivenNoise", "NoiseSource", "SeededNoise",
    "SAMPLERS", "DPMPP2MSampler", "DPMPP2SAncestralSampler", "EulerAncestralSampler", "EulerEDMSampler",
    "HeunEDMSampler", "LinearMultistepSampler", "SamplingPlan", "check_sampler", "make_sampler",
    "sampler_schedule",
]
