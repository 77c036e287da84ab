"""`locate` names the module that makes an error, not the ones that inherit it.

Each mutant changes one leaf deep inside the port (by monkeypatching); `locate` runs from the
committed golden `fixtures/golden/tiny-locate` (recorded with `record --modules`), so the
reference's module inputs and outputs are diffusers' own, and must name exactly that leaf with
every module before it within its bound. The unmutated port names none.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-locate"


@pytest.fixture(scope="module")
def setup():
    from parity.policy import load_policy
    from parity.recording import Recording
    from parity.recording import resolve_checkpoint
    from sdxl_ms import load_pipeline

    rec = Recording.load(GOLDEN)
    port = load_pipeline(resolve_checkpoint(rec.spec, None,
                                            rec.meta.get("checkpoint_generator_version")))
    return rec, port, load_policy()


def _locate(setup, stage):
    from parity.locate import locate

    rec, port, policy = setup
    return locate(rec, port, policy, stage)


# ---- the mutants: (stage, the leaf locate must name, patch(port model, monkeypatch)) ----------

def _forward(monkeypatch, module, fn):
    monkeypatch.setattr(module, "forward", types.MethodType(fn, module))


def layer_norm_eps(m, mp):
    mp.setattr(m.unet.middle_block[1].transformer_blocks[0].norm2, "eps", 1e-6)


def attn2_scale(m, mp):
    from sdxl_ms.nn.layers import attention_t

    attn = m.unet.output_blocks[3][1].transformer_blocks[0].attn2

    def forward(self, p, x, context, batch):  # logits scaled by 1.25 / sqrt(d) instead of 1 / sqrt(d)
        heads_t = attention_t(x, context, batch, self.heads, p["to_q"]["weight"] * 1.25,
                              p["to_k"]["weight"], p["to_v"]["weight"])
        return self.to_out[0].from_transposed(p, heads_t)
    _forward(mp, attn, forward)


def geglu_tanh(m, mp):
    from mindspore import ops

    geglu = m.unet.input_blocks[4][1].transformer_blocks[0].ff.net[0]

    def forward(self, p, x):
        y_t = self.proj.transposed_out(p, x)
        inner = y_t.shape[0] // 2
        return y_t[:inner] * ops.gelu(y_t[inner:], approximate="tanh")
    _forward(mp, geglu, forward)


def resblock_norm2(m, mp):
    mp.setattr(m.unet.output_blocks[2][0].out_layers[0], "num_groups", 8)


def label_emb_linear(m, mp):
    from sdxl_ms.nn.layers import linear

    lin = m.unet.label_emb[0][2]

    def forward(self, p, x):  # the bias dropped
        return linear(x, p["weight"], None)
    _forward(mp, lin, forward)


def clip_l_activation(m, mp):
    from sdxl_ms.nn.layers import gelu

    mp.setattr(m.conditioner.embedders[0].transformer.text_model.encoder.layers[1].mlp, "act",
               gelu)


def big_g_attention(m, mp):
    from sdxl_ms.nn.layers import attend_t, linear_t

    attn = m.conditioner.embedders[1].model.transformer.resblocks[1].attn

    def forward(self, p, x, batch):  # the causal mask forgotten
        w = self.width
        qkv = linear_t(x, p["in_proj_weight"], p["in_proj_bias"])
        heads_t = attend_t(qkv[:w], qkv[w:2 * w], qkv[2 * w:], batch, self.heads, causal=False)
        return self.out_proj.from_transposed(p, heads_t)
    _forward(mp, attn, forward)


def vae_mid_attention(m, mp):
    attn = m.first_stage_model.decoder.mid.attn_1
    faithful = attn.forward

    def forward(self, p, x):  # the residual connection forgotten
        return faithful(p, x) - x
    _forward(mp, attn, forward)


def vae_upsample_conv(m, mp):
    from sdxl_ms.nn.layers import conv2d

    conv = m.first_stage_model.decoder.up[1].upsample.conv

    def forward(self, p, x):  # kernel rows and columns swapped
        return conv2d(x, p["weight"].transpose(0, 1, 3, 2), p["bias"], self.stride, self.padding)
    _forward(mp, conv, forward)


MUTANTS = {
    "layer_norm_eps": ("unet", "middle_block.1.transformer_blocks.0.norm2", layer_norm_eps),
    "attn2_scale": ("unet", "output_blocks.3.1.transformer_blocks.0.attn2", attn2_scale),
    "geglu_tanh": ("unet", "input_blocks.4.1.transformer_blocks.0.ff.net.0", geglu_tanh),
    "resblock_norm2": ("unet", "output_blocks.2.0.out_layers.0", resblock_norm2),
    "label_emb_linear": ("unet", "label_emb.0.2", label_emb_linear),
    "clip_l_activation": ("conditioner", "text_model.encoder.layers.1.mlp", clip_l_activation),
    "big_g_attention": ("conditioner", "transformer.resblocks.1.attn", big_g_attention),
    "vae_mid_attention": ("decode", "decoder.mid.attn_1", vae_mid_attention),
    "vae_upsample_conv": ("decode", "decoder.up.1.upsample.conv", vae_upsample_conv),
}


@pytest.mark.parametrize("stage", ["conditioner", "unet", "decode"])
def test_the_faithful_port_names_no_module(setup, stage):
    loc = _locate(setup, stage)
    assert loc.rows and all(r.error == "" for r in loc.rows)
    worst = max(loc.rows, key=lambda r: r.own / r.bound)
    assert loc.culprit is None, loc.describe()
    assert worst.own < worst.bound


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_a_deep_mutant_is_named_exactly(setup, monkeypatch, name):
    stage, leaf, patch = MUTANTS[name]
    patch(setup[1].model, monkeypatch)
    loc = _locate(setup, stage)
    culprit = loc.culprit
    assert culprit is not None, f"{name}: nothing named"
    assert culprit.module == leaf, loc.describe()
    before = loc.rows[:loc.rows.index(culprit)]
    assert all(r.own <= r.bound for r in before)
    print(f"{name}: {loc.describe()} (x{culprit.own / culprit.bound:.0f} its bound)")


def test_a_barely_failing_stage_is_named_with_a_wide_margin(setup, monkeypatch):
    """LayerNorm eps 1e-6 instead of 1e-5 in every transformer block: at stage level just over
    the UNet's bound, at module level many times the LayerNorm bound."""
    from sdxl_ms.models.unet import BasicTransformerBlock

    for _, cell in setup[1].model.unet.cells_and_names():
        if isinstance(cell, BasicTransformerBlock):
            for norm in (cell.norm1, cell.norm2, cell.norm3):
                monkeypatch.setattr(norm, "eps", 1e-6)
    loc = _locate(setup, "unet")
    culprit = loc.culprit
    assert culprit is not None and culprit.kind == "LayerNorm"
    assert culprit.module == "input_blocks.4.1.transformer_blocks.0.norm1"
    # 4.2e-6 against the calibrated bound 5e-7 (3x the largest LayerNorm floor, 1.4e-7)
    assert culprit.own > 5 * culprit.bound, loc.describe()


def test_locate_runs_from_the_golden_without_torch(tmp_path):
    """The CLI on the committed golden, with torch and diffusers made unimportable."""
    out = tmp_path / "loc"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; "
            "from parity.cli import main; sys.exit(main(['locate', '--golden', sys.argv[1], "
            "'--out', sys.argv[2], '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code, str(GOLDEN), str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("PASS: no module over its bound")
    report = json.loads((out / "report.json").read_text())
    assert report["first_divergent_module"] is None
    stages = [loc["stage"] for loc in report["localisation"]]
    assert stages == ["conditioner", "unet", "decode"]
    assert all(len(loc["modules"]) > 20 for loc in report["localisation"])
    assert "module table" in (out / "index.html").read_text()


def test_locate_leaves_nothing_in_the_temp_folder(tmp_path):
    """A live capture (the default golden has no module capture) writes the reference's module
    tensors to a temporary folder of its own, and torch's import makes a cache folder there:
    neither may stay behind."""
    import os

    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "loc"
    env = {**os.environ, "TMPDIR": str(temp)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "locate", "--golden",
                           str(REPO_ROOT / "fixtures" / "golden" / "tiny-default"),
                           "--stage", "decode", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "modules compared: decode" in proc.stdout
    assert sorted(p.name for p in temp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loc", "tmp"]


def test_check_locate_names_the_module_in_the_headline_and_report(setup, tmp_path, monkeypatch):
    from parity.runner import check

    rec, port, policy = setup
    label_emb_linear(port.model, monkeypatch)
    report = check(rec, tmp_path / "r", policy=policy, port=port, locate=True,
                   stages=("unet",))
    assert not report.ok
    m = report.first_divergent_module
    assert m["module"] == "label_emb.0.2" and m["reference_module"] == "unet/add_embedding.linear_2"
    assert m["stage"] == "unet" and m["step"] == 0 and m["value"] > m["bound"]
    assert report.headline().startswith("FAIL at stage 'unet', step 0, module 'label_emb.0.2' "
                                        "(add_embedding.linear_2): own rel_l2 ")
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["first_divergent_module"]["module"] == "label_emb.0.2"
    assert len(saved["localisation"][0]["modules"]) > 100
    assert "culprit #" in (tmp_path / "r" / "index.html").read_text()
    assert "**OVER**" in (tmp_path / "r" / "report.md").read_text()
