"""Typed configs round-trip through diffusers' config files, and a diffusers folder whose widths
match no preset loads from its own config.json files and matches diffusers on them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import rel_l2
from sdxl_ms.config import PRESETS, TINY
from sdxl_ms.weights.diffusers_configs import pipeline_configs, sdxl_config_from_diffusers

# the tiny structure at other widths, head sizes and depths than either preset
ODD = dataclasses.replace(
    TINY, name="odd",
    unet=dataclasses.replace(TINY.unet, model_channels=24, channel_mult=(1, 2, 3),
                             transformer_depth=(0, 2, 1), transformer_depth_middle=1,
                             num_head_channels=12, norm_groups=8),
    vae=dataclasses.replace(TINY.vae, ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8),
    default_size=64)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_diffusers_configs(name):
    cfg = PRESETS[name]
    pads = (cfg.conditioner.clip_l.pad_token, cfg.conditioner.clip_g.pad_token)
    assert sdxl_config_from_diffusers(pipeline_configs(cfg), pads, name=name) == cfg


def test_odd_config_round_trips():
    assert sdxl_config_from_diffusers(pipeline_configs(ODD), ("<|endoftext|>", "!"), "odd") == ODD


def test_folder_with_its_own_widths_loads_and_matches_diffusers(tmp_path, capsys):
    from parity.reference import load_reference
    from sdxl_ms import load_pipeline
    from sdxl_ms.weights.synthetic import make_checkpoint

    folder = make_checkpoint(ODD, 3, tmp_path / "odd-diffusers", "diffusers")
    port = load_pipeline(folder)
    assert port.cfg.unet == ODD.unet and port.cfg.vae == ODD.vae
    assert port.cfg.conditioner == ODD.conditioner and port.cfg.name == "config:odd-diffusers"
    ref = load_reference(folder)
    from sdxl_ms.cli import main

    assert main(["inspect", str(folder)]) == 0
    assert "matches the folder's own config.json files (UNet model_channels 24" in (
        capsys.readouterr().out)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, ODD.unet.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, ODD.conditioner.pooled_dim)).astype(np.float32)
    time_ids = np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32)
    t = np.array([501.0], np.float32)
    want = ref.unet(x, t, ctx, pooled, time_ids)
    assert rel_l2(port.unet(x, t, ctx, pooled, time_ids), want) < 1e-5

    cond = dict(original_size=(64, 64), target_size=(64, 64))
    got, want = port.encode_prompt("a red cube", "blurry", **cond), ref.encode_prompt(
        "a red cube", "blurry", **cond)
    for key in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds"):
        assert rel_l2(got[key], want[key]) < 1e-5, key
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert rel_l2(port.decode(latents), ref.decode(latents)) < 1e-5


def test_small_has_sdxl_base_widths_where_rounding_depends_on_them():
    """The `small` preset's claim, checked against the sdxl-base preset (whose widths the
    public checkpoint's shapes pin, tests/test_sdxl_ms/test_unet.py): every width a module's
    reductions run over is sdxl-base's; only counts (layers, levels, blocks) are fewer."""
    from sdxl_ms.config import SDXL_BASE, SMALL

    for enc in ("clip_l", "clip_g"):
        s, b = getattr(SMALL.conditioner, enc), getattr(SDXL_BASE.conditioner, enc)
        assert (s.width, s.heads, s.mlp_width, s.activation, s.projection_dim) == \
            (b.width, b.heads, b.mlp_width, b.activation, b.projection_dim)
        assert s.layers < b.layers
    assert SMALL.conditioner.size_embed_dim == SDXL_BASE.conditioner.size_embed_dim
    su, bu = SMALL.unet, SDXL_BASE.unet
    assert (su.model_channels, su.num_head_channels, su.context_dim, su.adm_in_channels,
            su.norm_groups) == (bu.model_channels, 64, 2048, 2816, 32)
    assert su.channel_mult == bu.channel_mult[:2]  # the first two levels: 320 and 640 wide
    assert su.time_embed_dim == bu.time_embed_dim == 1280
    assert len(su.channel_mult) < len(bu.channel_mult)
    assert sum(su.transformer_depth) + su.transformer_depth_middle < \
        sum(bu.transformer_depth) + bu.transformer_depth_middle
    sv, bv = SMALL.vae, SDXL_BASE.vae
    assert (sv.ch, sv.ch_mult, sv.norm_groups, sv.downsample_factor) == \
        (bv.ch, bv.ch_mult, bv.norm_groups, bv.downsample_factor)
    assert sv.num_res_blocks < bv.num_res_blocks
