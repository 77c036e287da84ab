"""The float64 truth: each side's error against it, and the verdict "no worse than the
reference itself" in reduced precision (`fixtures/golden/tiny-float16`, recorded with
`sdxl-parity record --dtype float16 --sampler euler --steps 2`, truth on by default)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

GOLDEN16 = REPO_ROOT / "fixtures" / "golden" / "tiny-float16"


def test_truth_metrics_against_numpy():
    from parity.metrics import compare

    rng = np.random.default_rng(0)
    truth = rng.standard_normal((3, 50))
    ref = truth + 1e-3 * rng.standard_normal(truth.shape)
    port = truth + 3e-3 * rng.standard_normal(truth.shape)
    m = compare(ref, port, rtol=1e-2, atol=1e-3, truth=truth, truth_floor=1e-4)
    want_ref = np.linalg.norm(ref - truth) / np.linalg.norm(truth)
    want_port = np.linalg.norm(port - truth) / np.linalg.norm(truth)
    assert m.ref_vs_truth == pytest.approx(want_ref, rel=1e-12)
    assert m.port_vs_truth == pytest.approx(want_port, rel=1e-12)
    assert m.truth_ratio == pytest.approx(want_port / want_ref, rel=1e-12)
    floored = compare(truth, port, rtol=1e-2, atol=1e-3, truth=truth, truth_floor=1e-2)
    assert floored.truth_ratio == pytest.approx(want_port / 1e-2, rel=1e-12)  # ref exact: floor


def test_truth_ratio_replaces_the_port_vs_reference_bounds():
    from parity.metrics import compare
    from parity.policy import load_policy

    policy = load_policy()
    rng = np.random.default_rng(1)
    truth = rng.standard_normal(4000)
    ref = truth + 4e-2 * rng.standard_normal(truth.shape)  # apart by 5.7e-2 > fp16's fail 5e-2...
    port = truth + 4e-2 * rng.standard_normal(truth.shape)
    tol = policy.tolerances("unet", "float16")
    without = policy.judge("unet", "float16", compare(ref, port, **tol))
    with_truth = policy.judge("unet", "float16", compare(
        ref, port, **tol, truth=truth, truth_floor=policy.truth_floor("unet", "float16")))
    assert without.verdict.value == "fail"
    assert any("rel_l2" in r for r in without.reasons)
    # ...and no worse than the reference: judged by truth_ratio (PSNR and cosine stay backstops)
    assert with_truth.verdict.value != "fail", with_truth.reasons
    assert not any(r.startswith(("rel_l2", "mismatch_ratio")) for r in with_truth.reasons)


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    from parity.recording import Recording
    from parity.recording import resolve_checkpoint
    from sdxl_ms import load_pipeline

    rec = Recording.load(GOLDEN16)
    ckpt = resolve_checkpoint(rec.spec, None, rec.meta.get("checkpoint_generator_version"))
    return rec, load_pipeline(ckpt, "float16")


def _check(fp16, tmp_path, stages=("conditioner", "unet", "decode")):
    from parity.runner import check

    rec, port = fp16
    return check(rec, tmp_path, port=port, stages=stages)


def test_the_float16_port_is_no_worse_than_the_float16_reference(fp16, tmp_path):
    report = _check(fp16, tmp_path)
    assert report.ok, report.headline()
    for name in ("conditioner", "unet", "decode"):
        for t in report.stages[name].tensors:
            if hasattr(t.metrics, "truth_ratio") and t.metrics.truth_ratio is not None:
                assert t.metrics.port_vs_truth is not None and t.metrics.ref_vs_truth is not None
                assert t.metrics.truth_ratio < 2
    unet = report.stages["unet"].tensors
    assert all(t.metrics.truth_ratio is not None for t in unet)


def test_a_float16_vae_without_the_upcast_fails_at_decode(fp16, tmp_path, monkeypatch):
    from sdxl_ms.pipeline import SDXLPipeline

    monkeypatch.setattr(SDXLPipeline, "decoding_vae", lambda self: self.model.first_stage_model)
    report = _check(fp16, tmp_path)
    assert report.stages["unet"].verdict.value == "pass"
    assert report.stages["decode"].verdict.value == "fail"
    assert "truth_ratio" in report.headline()


def test_bfloat16_on_the_cpu_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--dtype", "bfloat16",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sdxl-parity")]
    assert len(lines) == 1 and "no bfloat16 kernels" in lines[0], proc.stderr[-1000:]
    assert not (tmp_path / "r").exists()


def test_image_truth_metrics_against_numpy():
    from parity.metrics import image_metrics

    rng = np.random.default_rng(2)
    truth = rng.uniform(20, 235, (16, 16, 3))
    ref = np.clip(np.round(truth + rng.normal(0, 1, truth.shape)), 0, 255).astype(np.uint8)
    port = np.clip(np.round(truth + rng.normal(0, 3, truth.shape)), 0, 255).astype(np.uint8)
    m = image_metrics(ref, port, truth=truth, truth_floor=1e-4)
    want_ref = np.linalg.norm(ref - truth) / np.linalg.norm(truth)
    want_port = np.linalg.norm(port - truth) / np.linalg.norm(truth)
    assert m.ref_vs_truth == pytest.approx(want_ref, rel=1e-12)
    assert m.truth_ratio == pytest.approx(want_port / want_ref, rel=1e-12)
    assert m.values()["truth_ratio"] == m.truth_ratio
    assert "truth_ratio" not in image_metrics(ref, port).values()


# ---- truth for the sampler, trajectory and image stages ----------------------------------------

@pytest.fixture(scope="module")
def tiny_truth(tmp_path_factory):
    """Recordings with the float64 truth of every stage: float32 (euler) and float16
    (euler and euler_a, so an ancestral sampler's shared step noise is in it), 2 steps."""
    from parity.reference_process import record_to_folder
    from parity.recording import Recording, RunSpec, resolve_checkpoint

    out = {}
    for dtype, samplers in (("float32", ("euler",)), ("float16", ("euler", "euler_a"))):
        spec = RunSpec(dtype=dtype, samplers=samplers, steps=2)
        folder = tmp_path_factory.mktemp(f"truth-{dtype}") / "rec"
        record_to_folder(spec, resolve_checkpoint(spec), folder, truth=True)
        out[dtype] = Recording.load(folder)
    return out


def _euler_in_float64(rec, sampler="euler"):
    """Euler from the recorded noise and UNet outputs, written from its formula in numpy
    float64: x_in_k = x_k / sqrt(sigma_k^2 + 1), x_k+1 = x_k + (sigma_k+1 - sigma_k) * eps_k
    with eps_k the CFG combination of the recorded pair."""
    from parity.recording import call_key, sampler_key

    schedule = rec.schedules[sampler]
    sigmas = np.asarray(schedule["sigmas"], np.float64)
    x = rec.get(sampler_key(sampler, "initial_noise")).astype(np.float64)
    x = x * schedule["init_noise_sigma"]
    x_ins, latents = [], []
    for k in range(rec.spec.steps):
        x_ins.append(np.concatenate([x, x]) / np.sqrt(sigmas[k] ** 2 + 1))
        uncond, cond = rec.get(call_key(sampler, k, "eps")).astype(np.float64)
        guided = uncond + rec.spec.guidance * (cond - uncond)
        x = x + (sigmas[k + 1] - sigmas[k]) * guided[None]
        latents.append(x)
    return x_ins, np.stack(latents)


def test_the_sampler_truth_is_the_recorded_unet_outputs_replayed_in_float64(tiny_truth):
    from conftest import rel_l2
    from parity.recording import call_key, sampler_key

    for rec in tiny_truth.values():
        x_ins, latents = _euler_in_float64(rec)
        # diffusers' Euler step computes in float32 whatever the latents' dtype: 6e-8
        assert rel_l2(rec.truth(sampler_key("euler", "replay_latents")), latents) < 1e-6
        for k, x_in in enumerate(x_ins):
            assert rel_l2(rec.truth(call_key("euler", k, "x_in")), x_in) < 1e-6
            assert rec.truth(call_key("euler", k, "timestep")) == pytest.approx(
                rec.get(call_key("euler", k, "timestep")))
    # the float32 reference is the truth's float32 rounding; the float16 one is far from it
    f32, f16 = (tiny_truth[d] for d in ("float32", "float16"))
    key = sampler_key("euler", "latents")
    assert rel_l2(f32.truth(sampler_key("euler", "replay_latents")), f32.get(key)) < 1e-6
    assert rel_l2(f16.truth(sampler_key("euler", "replay_latents")), f16.get(key)) > 1e-4


def test_the_free_run_truth_is_the_float64_pipeline_from_the_same_noise(tiny_truth):
    from conftest import rel_l2
    from parity.recording import sampler_key

    rec = tiny_truth["float32"]
    latents = rec.truth(sampler_key("euler", "latents"))
    assert latents.shape == rec.get(sampler_key("euler", "latents")).shape
    # float32 networks against float64 ones, from the same noise: float32 rounding only
    assert rel_l2(latents, rec.get(sampler_key("euler", "latents"))) < 1e-5
    image = rec.truth(sampler_key("euler", "image"))
    assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 255
    assert np.abs(image - rec.get(sampler_key("euler", "image"))).max() <= 0.5 + 1e-3


def test_a_faithful_float16_run_passes_with_a_truth_ratio_in_every_stage(tiny_truth, tmp_path):
    from parity.recording import resolve_checkpoint
    from parity.runner import check
    from sdxl_ms import load_pipeline

    rec = tiny_truth["float16"]
    port = load_pipeline(resolve_checkpoint(rec.spec), "float16")
    report = check(rec, tmp_path, port=port)
    assert report.headline().startswith("PASS"), report.headline()
    for name in ("conditioner", "unet", "sampler", "trajectory", "decode", "image"):
        for t in report.stages[name].tensors:
            if t.metrics.kind == "exact":  # ids and SDXL's zeroed negatives: bit for bit
                continue
            assert t.metrics.truth_ratio is not None, (name, t.name)
    # the built-in sampler keeps its latents in float32, the reference rounds them to float16
    sampler = [t.metrics for t in report.stages["sampler"].tensors if "latents" in t.name]
    assert all(m.port_vs_truth < 1e-6 < 1e-4 < m.ref_vs_truth for m in sampler)


# ---- per-module truths: float16 precision bugs that stay inside a stage's noise ------------

@pytest.fixture(scope="module")
def fp16_modules(tmp_path_factory):
    """A float16 recording with every module's float64 truth (`record --modules --truth`),
    and the float16 port."""
    from parity.reference_process import record_to_folder
    from parity.recording import Recording, RunSpec
    from parity.recording import resolve_checkpoint
    from sdxl_ms import load_pipeline

    spec = RunSpec(dtype="float16", samplers=("euler",), steps=2)
    ckpt = resolve_checkpoint(spec)
    folder = tmp_path_factory.mktemp("fp16-modules") / "rec"
    record_to_folder(spec, ckpt, folder, truth=True, modules=True)
    return Recording.load(folder), load_pipeline(ckpt, "float16")


def _module_results(report, stage):
    return [t for t in report.stages[stage].tensors if t.name.startswith("module/")]


def test_every_module_of_the_faithful_float16_port_is_within_its_truth_bound(fp16_modules,
                                                                             tmp_path):
    from parity.policy import load_policy

    floor = load_policy().module_truth_bound("Linear", "float16")[1]
    report = _check(fp16_modules, tmp_path)
    assert report.ok, report.headline()
    for stage, at_least in (("conditioner", 50), ("unet", 400), ("decode", 80)):
        modules = _module_results(report, stage)
        assert len(modules) >= at_least, (stage, len(modules))
        for t in modules:  # three numbers and their ratio, independently recomputed above
            m = t.metrics
            assert m.ref_vs_truth is not None and m.port_vs_truth is not None
            assert m.truth_ratio == pytest.approx(m.port_vs_truth / max(m.ref_vs_truth, floor))
    # a row per attention core where the port's q, k, v are modules of their own: CLIP-L's
    # two layers in use, the UNet's 17 transformer blocks' two, the VAE's one (bigG computes
    # q, k and v in one in_proj of the attention's own: no core row)
    cores = {stage: sum(t.name.endswith(" (core)") for t in _module_results(report, stage))
             for stage in ("conditioner", "unet", "decode")}
    assert cores == {"conditioner": 2, "unet": 34, "decode": 1}, cores
    sinusoid = report.stages["unet"].find("module/time_proj", 0)
    assert sinusoid is not None and sinusoid.metrics.port_vs_truth < 1e-6  # float32 on both sides


@pytest.mark.parametrize("bug", ["softmax", "groupnorm", "timestep", "vae"])
def test_a_float16_precision_bug_fails_at_its_stage_naming_its_module(bug, fp16_modules,
                                                                      tmp_path, monkeypatch):
    from fp16_bugs import FAILS_AT, inject

    inject(bug, monkeypatch.setattr)
    stage = FAILS_AT[bug]
    # the stages up to the bug's own (the faithful port passes them all, test above); the vae
    # bug leaves the UNet alone, so its check skips the UNet's 478 modules
    upto = {"conditioner": ("conditioner",), "unet": ("conditioner", "unet"),
            "decode": ("conditioner", "decode")}[stage]
    report = _check(fp16_modules, tmp_path, stages=upto)
    failing = [s.name for s in report.ordered_stages() if s.verdict.value == "fail"]
    assert failing[:1] == [stage], report.headline()
    kind = {"softmax": "CLIPAttentionCore", "groupnorm": "GroupNorm",
            "timestep": "SinusoidalTimesteps", "vae": "Conv2d"}[bug]
    failing = [t for t in _module_results(report, stage) if t.verdict.value == "fail"]
    assert failing and any(f"({kind})" in t.reasons[0] for t in failing), \
        [t.reasons for t in failing]
    if bug != "vae":  # one module kind is wrong, and only modules of that kind fail
        assert all(f"({kind})" in t.reasons[0] for t in failing), [t.reasons for t in failing]


def _softmax_attention(q, k, v, heads: int, causal: bool) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v per image and head, in float64 numpy: (B, L, heads*d)."""
    b, length, inner = q.shape
    d = inner // heads
    split = lambda t: t.astype(np.float64).reshape(b, t.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    if causal:
        scores = scores + np.triu(np.full((length, k.shape[1]), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, length, inner)


def test_an_attention_cores_truth_is_float64_attention_on_the_references_q_k_v(fp16_modules):
    """Each captured attention core (`module_kinds.ATTENTION_PARTS`) holds the reference's q,
    k, v (its projections' outputs), its core output (the output projection's input) and the
    core's float64 truth on exactly those q, k, v: here recomputed in numpy, causal in the
    text encoders, and the reference's own float16 core is within float16 rounding of it."""
    from parity.module_capture import CaptureIndex, CaptureReader
    from sdxl_ms.config import TINY

    rec, _ = fp16_modules
    heads = {"CLIPAttention": TINY.conditioner.clip_l.heads,
             "MultiheadAttention": TINY.conditioner.clip_g.heads, "AttnBlock": 1}
    checked = {}
    for stage in ("conditioner", "unet", "decode"):
        index_dict, path = rec.modules[stage]
        reader = CaptureReader(path, CaptureIndex.from_dict(index_dict))
        try:
            for i, pair in enumerate(reader.index.pairs):
                if "core_truth" not in reader.index.members[i]:
                    continue
                got = reader.tensors(i)
                n = heads.get(pair.kind) or got["q"].shape[-1] // TINY.unet.num_head_channels
                want = _softmax_attention(got["q"], got["k"], got["v"], n,
                                          causal=stage == "conditioner")
                truth = got["core_truth"].reshape(want.shape)
                assert np.linalg.norm(truth - want) <= 1e-6 * np.linalg.norm(want), pair.reference
                own = np.linalg.norm(got["core"].reshape(want.shape) - want) / np.linalg.norm(want)
                assert (1e-5 if stage == "decode" else 2e-3) > own, (pair.reference, own)
                checked[pair.kind] = checked.get(pair.kind, 0) + 1
        finally:
            reader.close()
    # CLIP-L's 3 layers and bigG's 3, every UNet attention, the VAE's mid-block attention
    assert checked == {"CLIPAttention": 3, "MultiheadAttention": 3, "CrossAttention": 34,
                       "AttnBlock": 1}, checked


@pytest.mark.parametrize("stage", ["conditioner", "decode"])
def test_a_module_twin_computes_what_the_float64_pipeline_computes(stage):
    """Module truths come from a float64 copy of the float16 module itself (no float64
    pipeline resident): bit for bit what the float64 pipeline on the rounded weights
    (`load_truth`) computes on the same arguments, the VAE's float32 decoding copy included."""
    import torch

    from parity.module_pairs import captured_kinds, reference_inputs, reference_module_table
    from parity.recording import RunSpec, resolve_checkpoint
    from parity.reference import load_reference
    from parity.reference_capture import _float64, float64_twin
    from parity.reference_run import load_truth

    ckpt = resolve_checkpoint(RunSpec(dtype="float16"))
    ref, truth = load_reference(ckpt, "float16"), load_truth(ckpt, "float16")
    modules, twins = reference_module_table(ref, stage), reference_module_table(truth, stage)
    compared = {}

    def hook_for(name):
        def hook(module, args, kwargs, output):
            if name not in compared:
                a, k = _float64(args), _float64(kwargs)
                got = reference_inputs(args, kwargs, float64_twin(module)(*a, **k))["out"]
                want = reference_inputs(args, kwargs, twins[name](*a, **k))["out"]
                compared[name] = float((got - want).abs().max())
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n), with_kwargs=True)
               for n in captured_kinds(modules)]
    try:
        with torch.no_grad():
            if stage == "conditioner":
                ids = ref.tokenize(["a lighthouse at dusk"])["input_ids"]
                ref.pipe.text_encoder(torch.from_numpy(ids), output_hidden_states=True)
            else:
                ref.decode(np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32))
    finally:
        for h in handles:
            h.remove()
    assert len(compared) >= 20, sorted(compared)
    assert max(compared.values()) == 0.0, {n: v for n, v in compared.items() if v}
