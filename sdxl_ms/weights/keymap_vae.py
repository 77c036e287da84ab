"""VAE key map: sgm names (relative to `first_stage_model.`) <-> diffusers `AutoencoderKL` names
(relative to the `vae/` folder).

The differences are naming plus two structural ones: diffusers stores the mid-block attention
projections as Linear (C, C) where sgm has 1x1 convs (C, C, 1, 1), and diffusers numbers the
decoder's up blocks from the deepest level (sgm `decoder.up.{i}` is `decoder.up_blocks.{n-1-i}`).
"""
from __future__ import annotations

from typing import List

from ..config import VAEConfig
from .key_rule import CONV1X1_TO_LINEAR, KeyRule, rule


def _pair(sgm: str, diffusers: str) -> List[KeyRule]:
    return [rule(f"{sgm}.weight", f"{diffusers}.weight"), rule(f"{sgm}.bias", f"{diffusers}.bias")]


def _resnet(sgm: str, diffusers: str, shortcut: bool) -> List[KeyRule]:
    out: List[KeyRule] = []
    for leaf in ("norm1", "conv1", "norm2", "conv2"):
        out += _pair(f"{sgm}.{leaf}", f"{diffusers}.{leaf}")
    if shortcut:
        out += _pair(f"{sgm}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return out


def _attention(sgm: str, diffusers: str) -> List[KeyRule]:
    out = _pair(f"{sgm}.norm", f"{diffusers}.group_norm")
    for s, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        out += [rule(f"{sgm}.{s}.weight", f"{diffusers}.{d}.weight", CONV1X1_TO_LINEAR),
                rule(f"{sgm}.{s}.bias", f"{diffusers}.{d}.bias")]
    return out


def _mid(sgm: str, diffusers: str) -> List[KeyRule]:
    """sgm mid order (block_1, attn_1, block_2)."""
    return (_resnet(f"{sgm}.block_1", f"{diffusers}.resnets.0", False)
            + _attention(f"{sgm}.attn_1", f"{diffusers}.attentions.0")
            + _resnet(f"{sgm}.block_2", f"{diffusers}.resnets.1", False))


def vae_rules(cfg: VAEConfig) -> List[KeyRule]:
    """All VAE rules, in the port's (sgm) module-tree order."""
    n = len(cfg.ch_mult)
    widths = [cfg.ch * m for m in cfg.ch_mult]
    rules: List[KeyRule] = _pair("encoder.conv_in", "encoder.conv_in")
    block_in = cfg.ch
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            rules += _resnet(f"encoder.down.{i}.block.{j}",
                             f"encoder.down_blocks.{i}.resnets.{j}",
                             shortcut=(j == 0 and block_in != widths[i]))
        block_in = widths[i]
        if i != n - 1:
            rules += _pair(f"encoder.down.{i}.downsample.conv",
                           f"encoder.down_blocks.{i}.downsamplers.0.conv")
    rules += _mid("encoder.mid", "encoder.mid_block")
    rules += _pair("encoder.norm_out", "encoder.conv_norm_out")
    rules += _pair("encoder.conv_out", "encoder.conv_out")

    rules += _pair("decoder.conv_in", "decoder.conv_in")
    rules += _mid("decoder.mid", "decoder.mid_block")
    # level i's first block takes the output width of level i+1 (the deepest takes its own)
    for i in range(n):
        k = n - 1 - i
        block_in = widths[min(i + 1, n - 1)]
        for j in range(cfg.num_res_blocks + 1):
            rules += _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                             shortcut=(j == 0 and block_in != widths[i]))
        if i != 0:
            rules += _pair(f"decoder.up.{i}.upsample.conv",
                           f"decoder.up_blocks.{k}.upsamplers.0.conv")
    rules += _pair("decoder.norm_out", "decoder.conv_norm_out")
    rules += _pair("decoder.conv_out", "decoder.conv_out")

    rules += _pair("quant_conv", "quant_conv")
    rules += _pair("post_quant_conv", "post_quant_conv")
    return rules
