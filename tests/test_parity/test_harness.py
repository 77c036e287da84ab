"""The harness against the committed golden recording (no torch needed), and the proof that it
catches classic porting bugs: each injected bug (monkeypatched into the port, never a product
flag) must fail at the first stage it touches while every earlier stage passes."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from parity.recording import Recording
from parity.results import Verdict
from parity.runner import check
from parity.stages import STAGES
from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"
UNDO = []  # restores for bugs that monkeypatch cannot undo (weights changed in place)


@pytest.fixture(scope="module")
def golden():
    return Recording.load(GOLDEN)


@pytest.fixture(scope="module")
def port(golden):
    from parity.recording import resolve_checkpoint
    from sdxl_ms import load_pipeline

    ckpt = resolve_checkpoint(golden.spec, None, golden.meta.get("checkpoint_generator_version"))
    return load_pipeline(ckpt)


def test_check_golden_without_torch(tmp_path):
    """`sdxl-parity check --golden fixtures/...` exits 0 with torch blocked from import."""
    code = ("import sys; sys.modules['torch'] = None; from parity.cli import main; "
            f"sys.exit(main(['check', '--golden', {str(GOLDEN)!r}, '--out', {str(tmp_path)!r}, "
            "'--quiet', '--junit-xml', " + repr(str(tmp_path / 'junit.xml')) + "]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("PASS: 7/7 stages")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert list(report["stages"]) == list(STAGES)
    assert all(s["verdict"] == "pass" for s in report["stages"].values())
    assert (tmp_path / "index.html").read_text().count("data:image/png;base64") >= 6
    assert "<testsuite" in (tmp_path / "junit.xml").read_text()


def _text_mlps(model, embedder: int):
    enc = model.conditioner.embedders[embedder]
    return [c for _, c in enc.cells_and_names() if hasattr(c, "act")]


def _norms(cell, cls_name: str):
    return [c for _, c in cell.cells_and_names() if type(c).__name__ == cls_name]


def _tanh_gelu(x):
    return 0.5 * x * (1.0 + ops.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def bug_tanh_gelu_in_bigG(mp, port):
    for mlp in _text_mlps(port.model, 1):
        mp.setattr(mlp, "act", _tanh_gelu)


def bug_gelu_instead_of_quickgelu(mp, port):
    from sdxl_ms.nn.layers import gelu

    for mlp in _text_mlps(port.model, 0):
        mp.setattr(mlp, "act", gelu)


def bug_layernorm_eps_1e7(mp, port):
    for ln in _norms(port.model.conditioner.embedders[0], "LayerNorm"):
        mp.setattr(ln, "eps", 1e-7)


def bug_groupnorm_eps_mindspore_default(mp, port):
    # diffusers' VAE uses 1e-6; MindSpore's nn.GroupNorm defaults to 1e-5
    for gn in _norms(port.model.first_stage_model, "GroupNorm"):
        mp.setattr(gn, "eps", 1e-5)


def bug_missing_text_projection_transpose(mp, port):
    p = port.model.conditioner.embedders[1].model.text_projection
    loaded = p.asnumpy().copy()
    p.set_data(ms.Tensor(loaded.T.copy()))  # diffusers' Linear weight taken as sgm's x @ P
    UNDO.append(lambda: p.set_data(ms.Tensor(loaded)))


def bug_bigG_pads_with_eos(mp, port):
    mp.setattr(port, "tokenizer_2", port.tokenizer)  # CLIP-L's tokenizer pads with <|endoftext|>


def bug_swapped_add_time_ids(mp, port):
    original = type(port).encode_prompt

    def swapped(self, prompt, negative_prompt=None, *, original_size=None,
                crops_coords_top_left=(0, 0), target_size=None, **kw):
        return original(self, prompt, negative_prompt, original_size=target_size,
                        crops_coords_top_left=crops_coords_top_left, target_size=original_size, **kw)

    mp.setattr(type(port), "encode_prompt", swapped)


def bug_sgm_grid_for_diffusers(mp, port):
    import sdxl_ms.sampling as sampling

    original = sampling.make_sampler
    mp.setattr(sampling, "make_sampler",
               lambda name, steps, schedule="leading", **kw: original(name, steps, "sgm", **kw))


def bug_sd1_vae_scale(mp, port):
    cfg = port.cfg
    mp.setattr(port, "cfg", dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scale_factor=0.18215)))


def bug_cfg_uncond_cond_swapped(mp, port):
    from sdxl_ms.sampling import VanillaCFG

    def combine(self, out):
        out_c, out_u = np.split(out, 2)  # the halves read in the wrong order
        return out_u + np.float32(self.scale) * (out_c - out_u)

    mp.setattr(VanillaCFG, "combine", combine)


def bug_same_padding_on_stride2_conv(mp, port):
    from sdxl_ms.models import unet

    def forward(self, p, x):  # TF/MindSpore 'same' on stride 2 pads (0,1,0,1), not (1,1,1,1)
        op = p["op"]
        y = ops.conv2d(ops.pad(x, (0, 1, 0, 1)), op["weight"], stride=2, pad_mode="valid")
        return y + op["bias"].reshape(1, -1, 1, 1)

    mp.setattr(unet.Downsample, "forward", forward)


# (bug, the first stage it touches)
MUTANTS = [
    (bug_bigG_pads_with_eos, "tokens"),
    (bug_tanh_gelu_in_bigG, "conditioner"),
    (bug_gelu_instead_of_quickgelu, "conditioner"),
    (bug_layernorm_eps_1e7, "conditioner"),
    (bug_missing_text_projection_transpose, "conditioner"),
    (bug_swapped_add_time_ids, "conditioner"),
    (bug_cfg_uncond_cond_swapped, "unet"),
    (bug_same_padding_on_stride2_conv, "unet"),
    (bug_sgm_grid_for_diffusers, "sampler"),
    (bug_sd1_vae_scale, "decode"),
    (bug_groupnorm_eps_mindspore_default, "decode"),
]


@pytest.mark.parametrize("bug, first_stage", MUTANTS, ids=[m[0].__name__[4:] for m in MUTANTS])
def test_mutant_fails_at_its_first_stage(bug, first_stage, golden, port, tmp_path, monkeypatch):
    bug(monkeypatch, port)
    try:
        report = check(golden, tmp_path, port=port, fail_fast=True)
    finally:
        while UNDO:
            UNDO.pop()()
    verdicts = {name: report.stages[name].verdict for name in STAGES}
    earlier = STAGES[:STAGES.index(first_stage)]
    assert all(verdicts[s] != Verdict.FAIL for s in earlier), verdicts
    assert verdicts[first_stage] == Verdict.FAIL, (verdicts, report.headline())
    headline = report.headline()
    assert headline.startswith(f"FAIL at stage '{first_stage}'")
    # the report's first line names the failing stage (and the step, for stepped stages)
    first_line = (tmp_path / "report.md").read_text().splitlines()[0]
    assert first_line == headline
    if first_stage in ("unet", "sampler"):
        assert ", step " in headline


def test_unmutated_port_passes_fast_path(golden, port, tmp_path):
    """The same in-process check without a bug passes: the mutants fail because of the bug."""
    report = check(golden, tmp_path, port=port, fail_fast=True)
    assert report.verdict == Verdict.PASS, report.headline()
