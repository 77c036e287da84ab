"""UNet key map: sgm `model.diffusion_model.*` <-> diffusers `unet/*`.

sgm numbers its blocks flatly (input_blocks.N.M); diffusers groups them by level (down_blocks.L
resnets/attentions/downsamplers). The map is written out from the config, not derived from
either implementation, so a test comparing it to both module trees checks all three.
"""
from __future__ import annotations

from typing import List

from ..config import UNetConfig
from .key_rule import KeyRule, rule

WB = ("weight", "bias")

# sgm ResBlock leaf -> diffusers ResnetBlock2D leaf
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2"}


def _module(sgm: str, diffusers: str, leaves=WB) -> List[KeyRule]:
    return [rule(f"{sgm}.{leaf}", f"{diffusers}.{leaf}") for leaf in leaves]


def _resblock(sgm: str, diffusers: str, channels_change: bool) -> List[KeyRule]:
    rules = []
    for s, d in _RESBLOCK.items():
        rules += _module(f"{sgm}.{s}", f"{diffusers}.{d}")
    if channels_change:
        rules += _module(f"{sgm}.skip_connection", f"{diffusers}.conv_shortcut")
    return rules


def _transformer(sgm: str, diffusers: str, depth: int) -> List[KeyRule]:
    """SpatialTransformer: the inner names are the same on both sides."""
    leaves = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias"]
    for k in range(depth):
        b = f"transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            leaves += [f"{b}.{attn}.to_{x}.weight" for x in "qkv"]
            leaves += [f"{b}.{attn}.to_out.0.{w}" for w in WB]
        leaves += [f"{b}.ff.net.0.proj.{w}" for w in WB] + [f"{b}.ff.net.2.{w}" for w in WB]
        leaves += [f"{b}.norm{i}.{w}" for i in (1, 2, 3) for w in WB]
    leaves += ["proj_out.weight", "proj_out.bias"]
    return [rule(f"{sgm}.{leaf}", f"{diffusers}.{leaf}") for leaf in leaves]


def unet_rules(cfg: UNetConfig) -> List[KeyRule]:
    """Rules relative to `model.diffusion_model.` (sgm) and `unet/` (diffusers)."""
    mc, nrb, levels = cfg.model_channels, cfg.num_res_blocks, len(cfg.channel_mult)
    rules = (_module("time_embed.0", "time_embedding.linear_1")
             + _module("time_embed.2", "time_embedding.linear_2")
             + _module("label_emb.0.0", "add_embedding.linear_1")
             + _module("label_emb.0.2", "add_embedding.linear_2")
             + _module("input_blocks.0.0", "conv_in"))

    ch, skip_channels, index = mc, [mc], 1
    for level, mult in enumerate(cfg.channel_mult):
        depth = cfg.transformer_depth[level]
        for r in range(nrb):
            rules += _resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{r}",
                               ch != mult * mc)
            ch = mult * mc
            if depth:
                rules += _transformer(f"input_blocks.{index}.1",
                                      f"down_blocks.{level}.attentions.{r}", depth)
            skip_channels.append(ch)
            index += 1
        if level != levels - 1:
            rules += _module(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skip_channels.append(ch)
            index += 1

    rules += (_resblock("middle_block.0", "mid_block.resnets.0", False)
              + _transformer("middle_block.1", "mid_block.attentions.0", cfg.transformer_depth_middle)
              + _resblock("middle_block.2", "mid_block.resnets.1", False))

    index = 0
    for up, (level, mult) in enumerate(reversed(list(enumerate(cfg.channel_mult)))):
        depth = cfg.transformer_depth[level]
        for r in range(nrb + 1):
            in_ch = ch + skip_channels.pop()
            rules += _resblock(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{r}",
                               in_ch != mult * mc)
            ch = mult * mc
            if depth:
                rules += _transformer(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{r}",
                                      depth)
            if level and r == nrb:
                rules += _module(f"output_blocks.{index}.{2 if depth else 1}.conv",
                                 f"up_blocks.{up}.upsamplers.0.conv")
            index += 1

    rules += _module("out.0", "conv_norm_out") + _module("out.2", "conv_out")
    return rules
