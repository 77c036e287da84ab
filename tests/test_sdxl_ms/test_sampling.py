"""Samplers against the real diffusers schedulers, driven like StableDiffusionXLPipeline does.

Both sides get the same deterministic fake eps network (numpy, wrapped for torch), the same
initial noise and the same per-step noise, CFG 5 on eps with the batch uncond-then-cond. We
compare the timesteps each side feeds the network, init_noise_sigma and the final latents.
"""
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_euler_discrete

from parity.reference_run import full_step_latents
from parity.sampler_registry import unet_calls_per_sampler
from parity.schedulers import (DIFFUSERS_SCHEDULERS, diffusers_scheduler_config,
                               diffusers_scheduler_spec)
from sdxl_ms.sampling import (SAMPLERS, Denoiser, GivenNoise, GuidedDenoiser, IdentityGuider,
                              QuantizedTimesteps, SeededNoise, VanillaCFG, make_sampler,
                              sampler_schedule, training_sigmas)
from sdxl_ms.sampling.discretization import LogSigmaInterp, karras_schedule
from sdxl_ms.sampling.samplers import lms_coefficient
from sdxl_ms.weights.diffusers_configs import SDXL_SCHEDULER_CONFIG

SHAPE = (1, 4, 8, 8)
GUIDANCE = 5.0
UNCOND = np.zeros((1, 4, 1, 1), np.float32)
COND = (0.2 * np.linspace(-1, 1, 4)).astype(np.float32).reshape(1, 4, 1, 1)
REL_TOL = 1e-5
F32_ULP_AT_1000 = 2.0 ** -14  # 6.1e-5


def fake_eps(x, t, cond):
    """A smooth nonlinear eps 'network' of x, the timestep and the conditioning.

    Mostly `x_in` (what a trained eps network predicts at high noise), so the final latents are
    O(1) like real ones and a timestep off by one moves them by ~1e-4 relative.
    """
    f = np.float32
    t = np.broadcast_to(np.asarray(t, f).reshape(-1), (x.shape[0],)).reshape(-1, 1, 1, 1)
    out = f(0.8) * x + f(0.3) * np.tanh(f(0.5) * x + cond) + f(0.1) * t / f(1000)
    return out.astype(f)


class Recorder:
    """Wraps the numpy network and records the timestep of every call."""

    def __init__(self):
        self.timesteps = []

    def numpy(self, x, t, cond):
        self.timesteps.append(float(np.asarray(t).reshape(-1)[0]))
        return fake_eps(x, t, cond)

    def torch(self, x, t, cond):
        self.timesteps.append(float(t))
        return torch.from_numpy(fake_eps(x.numpy(), np.float32(float(t)), cond.numpy()))


def draws(n, seed=0):
    rng = np.random.default_rng(seed)
    initial = rng.standard_normal(SHAPE, dtype=np.float32)
    return initial, [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(n)]


def run_diffusers(scheduler, initial, per_step, monkeypatch, step_kwargs=None, on_step=None):
    """The SDXL pipeline's denoising loop on the fake network; `on_step` gets the latents after
    every scheduler step, as the pipeline's step callback does."""
    rec = Recorder()
    queue = [torch.from_numpy(a) for a in per_step]

    def given_randn(shape, **kwargs):
        return queue.pop(0)

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", given_randn)
    monkeypatch.setattr(scheduling_euler_discrete, "randn_tensor", given_randn)
    cond = torch.from_numpy(np.concatenate([UNCOND, COND]))
    latents = torch.from_numpy(initial) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps_u, eps_c = rec.torch(model_in, t, cond).chunk(2)
        eps = eps_u + GUIDANCE * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, **(step_kwargs or {}), return_dict=False)[0]
        if on_step:
            on_step(latents.numpy())
    return latents.numpy(), rec.timesteps


def run_port(plan, initial, per_step, guide="eps", callback=None):
    rec = Recorder()
    denoise = GuidedDenoiser(rec.numpy, Denoiser.for_schedule(plan.schedule), VanillaCFG(GUIDANCE, guide),
                             cond=COND, uncond=UNCOND)
    return plan(denoise, GivenNoise(initial, per_step), SHAPE, callback), rec.timesteps


def diffusers_scheduler(name, schedule, **spec_kwargs):
    config = diffusers_scheduler_config(name, schedule, **spec_kwargs)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def rel_diff(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


CASES = [(name, schedule, n)
         for name in DIFFUSERS_SCHEDULERS
         for schedule in ("leading", "trailing", "linspace", "karras")
         for n in (4, 10)
         if not (name == "euler_a" and schedule == "karras")]  # diffusers has no karras there


@pytest.mark.parametrize("name,schedule,n", CASES)
def test_matches_diffusers(name, schedule, n, monkeypatch):
    initial, per_step = draws(n)
    scheduler = diffusers_scheduler(name, schedule)
    scheduler.set_timesteps(n)
    ref, ref_t = run_diffusers(scheduler, initial, per_step, monkeypatch)
    plan = make_sampler(name, n, schedule)
    out, out_t = run_port(plan, initial, per_step)

    assert len(out_t) == len(ref_t)
    if schedule == "karras" and name != "dpmpp_2m":
        # float timesteps from log-sigma interpolation: torch's float32 sqrt (MKL) rounds some
        # training sigmas one ulp away; with diffusers' sigmas they are identical (next test)
        assert np.abs(np.subtract(out_t, ref_t)).max() <= F32_ULP_AT_1000
    else:
        assert out_t == ref_t
    sigma_max = float(scheduler.sigmas.max())
    if name == "dpmpp_2m":  # diffusers works in VP space: unit noise is VE noise * sqrt(1 + sigma^2)
        assert float(scheduler.init_noise_sigma) == 1.0
        expected_init = math.sqrt(1 + sigma_max**2)
    else:
        expected_init = float(scheduler.init_noise_sigma)
    assert float(plan.schedule.init_noise_sigma) == pytest.approx(expected_init, rel=1e-6)
    assert rel_diff(out, ref) <= REL_TOL, rel_diff(out, ref)


@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULERS))
def test_recorded_step_latents_are_the_ports(name, monkeypatch):
    """The registry's step facts as `record` applies them (`full_step_latents`): which step
    callbacks are whole steps, in which parametrisation, and how many UNet calls."""
    n = 4
    initial, per_step = draws(n)
    scheduler = diffusers_scheduler(name, "leading")
    scheduler.set_timesteps(n)
    steps, ours = [], []
    _, ref_t = run_diffusers(scheduler, initial, per_step, monkeypatch, on_step=steps.append)
    _, our_t = run_port(make_sampler(name, n), initial, per_step,
                        callback=lambda i, x, denoised: ours.append(x))
    assert len(ref_t) == len(our_t) == unet_calls_per_sampler(name, n)
    recorded = full_step_latents(name, steps, scheduler.sigmas.numpy(), n)
    assert rel_diff(recorded, np.stack(ours)) <= REL_TOL


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m"])
def test_karras_grid_bitwise_with_diffusers_training_sigmas(name):
    for n in (1, 4, 7, 10, 25):
        scheduler = diffusers_scheduler(name, "karras")
        train = np.array(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5)
        scheduler.set_timesteps(n)
        sched = sampler_schedule(name, n, "karras", train_sigmas=train)
        ts, sig = scheduler.timesteps.numpy(), scheduler.sigmas.numpy()
        if name == "heun":  # [t0, t1, t1, t2, t2, ...]
            ts, sig = np.concatenate([ts[:1], ts[1::2]]), np.concatenate([sig[:1], sig[1::2]])
        np.testing.assert_array_equal(sched.timesteps, ts.astype(np.float32))
        np.testing.assert_array_equal(sched.sigmas, sig)


def test_training_sigmas_match_diffusers_within_an_ulp():
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    ref = scheduler.sigmas[:-1].numpy()[::-1]
    mine = training_sigmas("diffusers")
    assert mine.dtype == np.float32
    np.testing.assert_array_less(np.abs(mine - ref), np.spacing(ref) * 1.01)
    float64 = training_sigmas("float64")
    assert float64.dtype == np.float64 and abs(float64[-1] - 14.6146) < 1e-4
    assert np.abs(training_sigmas("sgm") / float64 - 1).max() < 1e-6


def test_leading_grids_per_scheduler():
    assert list(sampler_schedule("euler", 4).timesteps) == [751, 501, 251, 1]
    assert list(sampler_schedule("dpmpp_2m", 4).timesteps) == [801, 601, 401, 201]
    assert list(sampler_schedule("euler", 40).timesteps[:2]) == [976, 951]


def test_sgm_grid_against_formula():
    n = 40
    sched = make_sampler("euler", n, "sgm").schedule
    expected = [(999 * (n - i)) // n for i in range(n)]  # floor(999 - 999 i / n), exactly
    assert expected[:2] == [999, 974] and expected[-1] == 24
    assert [int(t) for t in sched.timesteps] == expected
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    sigma_999 = math.sqrt((1 - acp[999]) / acp[999])
    assert round(sigma_999, 4) == 14.6146
    assert round(float(sched.sigmas[0]), 4) == 14.6146
    assert float(sched.init_noise_sigma) == pytest.approx(math.sqrt(1 + sigma_999**2), abs=1e-4)
    assert sched.sigmas[-1] == 0 and len(sched.sigmas) == n + 1


def test_sgm_denoiser_feeds_integer_indices_and_quantises():
    plan = make_sampler("dpmpp_2s_a", 5, "sgm")
    rec = Recorder()
    denoiser = Denoiser.for_schedule(plan.schedule)
    assert denoiser.quantize_sigma
    plan(GuidedDenoiser(rec.numpy, denoiser, cond=COND), SeededNoise(0), SHAPE)
    assert all(t == int(t) and 0 <= t <= 999 for t in rec.timesteps)
    assert rec.timesteps[0] == 999 and len(rec.timesteps) == 2 * 5 - 1  # midpoints, none at the end
    q = QuantizedTimesteps()
    assert q(q.sigmas[500] * 1.0001) == 500 and q.snap(q.sigmas[500] * 1.0001) == q.sigmas[500]


def test_dpmpp_2m_sigma_min_final_matches_diffusers_and_differs_from_sgm(monkeypatch):
    initial, _ = draws(0)
    scheduler = diffusers_scheduler("dpmpp_2m", "leading", final_sigma="sigma_min")
    scheduler.set_timesteps(10)
    ref, _ = run_diffusers(scheduler, initial, [], monkeypatch)
    ours, _ = run_port(make_sampler("dpmpp_2m", 10, final_sigma="sigma_min"), initial, [])
    sgm, _ = run_port(make_sampler("dpmpp_2m", 10, final_sigma="sigma_min", variant="sgm"), initial, [])
    # diffusers' final sample is at sigma_min in VP scale: x_vp = x_ve / sqrt(1 + sigma_min^2)
    ours_vp = ours / np.sqrt(1 + training_sigmas()[0].astype(np.float64) ** 2)
    assert rel_diff(ours_vp, ref) <= REL_TOL
    assert rel_diff(sgm, ours) > 1e-4  # lower_order_final: first-order last step in diffusers only


def test_euler_churn_matches_diffusers_step(monkeypatch):
    n = 10
    initial, per_step = draws(n)
    scheduler = diffusers_scheduler("euler", "leading")
    scheduler.set_timesteps(n)
    ref, _ = run_diffusers(scheduler, initial, per_step, monkeypatch, {"s_churn": 2.0})
    ours, _ = run_port(make_sampler("euler", n, s_churn=2.0), initial, per_step)
    sgm, _ = run_port(make_sampler("euler", n, s_churn=2.0, variant="sgm"), initial, per_step)
    assert rel_diff(ours, ref) <= REL_TOL
    assert rel_diff(sgm, ref) > 1e-3  # sgm churns before the network call


def test_guiding_eps_or_x0_agree_up_to_rounding():
    initial, per_step = draws(10)
    plan = make_sampler("dpmpp_2m", 10)
    eps, _ = run_port(plan, initial, per_step, "eps")
    x0, _ = run_port(plan, initial, per_step, "x0")
    assert 0 < rel_diff(x0, eps) <= REL_TOL


def test_dpmpp_2s_without_noise_is_a_second_order_ode_solver():
    """DPM++(2S) has no diffusers reference; with eta=0 it must converge to the probability-flow
    ODE solution (here 400 Heun steps) at second order: halving the step quarters the error."""
    initial, _ = draws(0)

    def solve(name, n, **options):
        plan = make_sampler(name, n, "karras", **options)
        denoise = GuidedDenoiser(fake_eps, Denoiser(timestep_map=LogSigmaInterp()), VanillaCFG(GUIDANCE),
                                 cond=COND, uncond=UNCOND)
        return plan(denoise, GivenNoise(initial), SHAPE)

    exact = solve("heun", 400, sigma_range="training")
    err20, err40 = (rel_diff(solve("dpmpp_2s_a", n, eta=0.0), exact) for n in (20, 40))
    assert err40 < 1e-3 and err20 / err40 > 3.5, (err20, err40)  # measured 2.2e-3, 5.5e-4


def test_ancestral_samplers_need_and_consume_noise():
    plan = make_sampler("dpmpp_2s_a", 4)
    denoise = GuidedDenoiser(fake_eps, Denoiser(timestep_map=LogSigmaInterp()), IdentityGuider(), cond=COND)
    initial, per_step = draws(4)
    with pytest.raises(IndexError, match="step 1, but only 1 per-step"):
        plan(denoise, GivenNoise(initial, per_step[:1]), SHAPE)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 8, 8\), the sampler needs \(2, 4, 8, 8\)"):
        plan(denoise, GivenNoise(initial), (2, 4, 8, 8))
    a = plan(denoise, GivenNoise(initial, per_step), SHAPE)
    b = plan(denoise, GivenNoise(initial, [p * 0 for p in per_step]), SHAPE)
    assert np.abs(a - b).max() > 1e-3  # the per-step noise reaches the result
    with pytest.raises(ValueError, match="pass a NoiseSource"):
        plan.sampler(denoise, initial, plan.schedule, None)


def test_lms_coefficients_match_quadrature():
    from scipy import integrate

    sigmas = sampler_schedule("lms", 10).sigmas.astype(np.float64)
    for i in range(10):
        order = min(i + 1, 4)
        for j in range(order):
            def basis(tau):
                return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                                 for k in range(order) if k != j)
            ref = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-10)[0]
            assert lms_coefficient(sigmas, i, j, order) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_errors_name_the_choices():
    valid = "euler, euler_a, heun, dpmpp_2m, dpmpp_2s_a, lms"
    with pytest.raises(ValueError, match=f"unknown sampler 'ddim'; valid choices: {valid}"):
        make_sampler("ddim", 10)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid choices: leading, trailing, "
                                         "linspace, karras, sgm"):
        make_sampler("euler", 10, "cosine")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            make_sampler("euler", bad)
    with pytest.raises(ValueError, match="unknown option"):
        make_sampler("euler", 10, eta=1.0)
    with pytest.raises(ValueError, match="unknown variant"):
        make_sampler("dpmpp_2m", 10, variant="k-diffusion")
    with pytest.raises(ValueError, match="no diffusers scheduler"):
        diffusers_scheduler_spec("dpmpp_2s_a")
    with pytest.raises(ValueError, match="sgm schedule"):
        diffusers_scheduler_spec("euler", "sgm")
    with pytest.raises(ValueError, match="no karras"):
        diffusers_scheduler_spec("euler_a", "karras")
    assert set(SAMPLERS) == {"euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2s_a", "lms"}


def test_seeded_noise_is_reproducible():
    a, b = SeededNoise(3), SeededNoise(3)
    np.testing.assert_array_equal(a.initial(SHAPE), b.initial(SHAPE))
    np.testing.assert_array_equal(a.step(0, SHAPE), b.step(0, SHAPE))
    assert a.initial(SHAPE).dtype == np.float32


def test_karras_defaults_from_training_sigmas():
    sched = karras_schedule(10)
    train = training_sigmas()
    assert sched.sigmas[0] == pytest.approx(train[-1], rel=1e-6)
    assert sched.sigmas[-2] == pytest.approx(train[0], rel=1e-6)
