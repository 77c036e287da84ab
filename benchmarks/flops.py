"""Analytic FLOP counts of the SDXL components, from the typed configs alone.

Convention (the one `torch.utils.flop_counter` uses, so the counts can be checked against it):
2 FLOPs per multiply-accumulate of every matmul, convolution and attention product
(Q K^T and P V); biases, norms, activations, softmax, resampling and other element-wise work
are not counted (they are a few percent of the total and memory-bound anyway).

The walkers below follow the constructors of `sdxl_ms.models` block by block, so a preset's
count is stated once for both sides. A component's count is the work its outputs need: the
CLIP-L tower stops after its penultimate layer (the port skips the last layer; diffusers runs it
and discards it, which shows up as a lower achieved FLOP/s for the reference).
"""
from __future__ import annotations

from typing import Dict, Optional

from sdxl_ms.config import SDXLConfig, TextEncoderConfig, UNetConfig, VAEConfig

COMPONENTS = ("text", "unet", "vae", "pipeline")
UNET_BATCH = 2  # one classifier-free-guidance step: the negative and the positive prompt
TEXT_BATCH = 2  # the prompt and its negative prompt


# ---- layers --------------------------------------------------------------------------------

def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


KINDS = ("matmul", "attention", "conv")
_counting = list(KINDS)  # the kinds the layer functions count; `flops_by_kind` narrows it


def _counted(kind: str, flops: int) -> int:
    return flops if kind in _counting else 0


def conv2d(c_in: int, c_out: int, kernel: int, h_out: int, w_out: int, batch: int = 1) -> int:
    """A k x k convolution producing (batch, c_out, h_out, w_out)."""
    return _counted("conv", 2 * batch * c_out * h_out * w_out * c_in * kernel * kernel)


def linear(n_in: int, n_out: int, tokens: int) -> int:
    """A dense layer applied to `tokens` rows."""
    return _counted("matmul", 2 * tokens * n_in * n_out)


def attention(batch: int, q_len: int, kv_len: int, inner: int) -> int:
    """softmax(Q K^T) V over all heads (inner = heads * head_dim): two batched matmuls.
    Masks (CLIP's causal one) are not exploited by either side, so they are not discounted."""
    return _counted("attention", 2 * (2 * batch * q_len * kv_len * inner))


# ---- UNet ------------------------------------------------------------------------------------

def unet_resblock(c_in: int, c_out: int, emb_dim: int, h: int, w: int, batch: int) -> int:
    flops = conv2d(c_in, c_out, 3, h, w, batch) + linear(emb_dim, c_out, batch)
    flops += conv2d(c_out, c_out, 3, h, w, batch)
    if c_in != c_out:
        flops += conv2d(c_in, c_out, 1, h, w, batch)  # skip_connection
    return flops


def transformer_block(dim: int, context_dim: int, tokens: int, context_len: int,
                      batch: int) -> int:
    """Self-attention, cross-attention to the text context, GEGLU feed-forward (x4)."""
    rows, ctx_rows = batch * tokens, batch * context_len
    self_attn = 4 * linear(dim, dim, rows) + attention(batch, tokens, tokens, dim)
    cross_attn = (2 * linear(dim, dim, rows) + 2 * linear(context_dim, dim, ctx_rows)
                  + attention(batch, tokens, context_len, dim))
    ff = linear(dim, 8 * dim, rows) + linear(4 * dim, dim, rows)
    return self_attn + cross_attn + ff


def spatial_transformer(channels: int, depth: int, context_dim: int, h: int, w: int,
                        batch: int, context_len: int) -> int:
    """Linear proj_in, `depth` blocks, linear proj_out (inner width = channels in SDXL)."""
    rows = batch * h * w
    blocks = depth * transformer_block(channels, context_dim, h * w, context_len, batch)
    return 2 * linear(channels, channels, rows) + blocks


def unet(cfg: UNetConfig, batch: int, height: int, width: int, context_len: int = 77) -> int:
    """One UNet evaluation on latents (batch, in_channels, height, width)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    h, w = height, width
    flops = linear(mc, ted, batch) + linear(ted, ted, batch)  # time_embed
    flops += linear(cfg.adm_in_channels, ted, batch) + linear(ted, ted, batch)  # label_emb

    def level_blocks(c_in: int, c_out: int, depth: int) -> int:
        f = unet_resblock(c_in, c_out, ted, h, w, batch)
        if depth > 0:
            f += spatial_transformer(c_out, depth, cfg.context_dim, h, w, batch, context_len)
        return f

    flops += conv2d(cfg.in_channels, mc, 3, h, w, batch)
    skips, ch = [mc], mc
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            flops += level_blocks(ch, mult * mc, cfg.transformer_depth[level])
            ch = mult * mc
            skips.append(ch)
        if level != last:  # Downsample: 3x3 stride 2 padding 1
            h, w = conv_out_size(h, 3, 2, 1), conv_out_size(w, 3, 2, 1)
            flops += conv2d(ch, ch, 3, h, w, batch)
            skips.append(ch)

    flops += 2 * unet_resblock(ch, ch, ted, h, w, batch)
    flops += spatial_transformer(ch, cfg.transformer_depth_middle, cfg.context_dim, h, w,
                                 batch, context_len)

    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            flops += level_blocks(ch + skips.pop(), mult * mc, cfg.transformer_depth[level])
            ch = mult * mc
            if level and i == cfg.num_res_blocks:  # Upsample: nearest x2 then 3x3 conv
                h, w = 2 * h, 2 * w
                flops += conv2d(ch, ch, 3, h, w, batch)
    flops += conv2d(mc, cfg.out_channels, 3, h, w, batch)
    return flops


# ---- VAE -------------------------------------------------------------------------------------

def vae_resblock(c_in: int, c_out: int, h: int, w: int, batch: int) -> int:
    flops = conv2d(c_in, c_out, 3, h, w, batch) + conv2d(c_out, c_out, 3, h, w, batch)
    if c_in != c_out:
        flops += conv2d(c_in, c_out, 1, h, w, batch)  # nin_shortcut
    return flops


def vae_attention(channels: int, h: int, w: int, batch: int) -> int:
    """Single-head self-attention over h*w positions with 1x1 q/k/v/proj_out."""
    return 4 * conv2d(channels, channels, 1, h, w, batch) + attention(batch, h * w, h * w, channels)


def vae_decode(cfg: VAEConfig, batch: int, latent_h: int, latent_w: int) -> int:
    """post_quant_conv then the decoder, latents (batch, z, latent_h, latent_w) -> image."""
    h, w = latent_h, latent_w
    flops = conv2d(cfg.z_channels, cfg.z_channels, 1, h, w, batch)  # post_quant_conv
    block_in = cfg.ch * cfg.ch_mult[-1]
    flops += conv2d(cfg.z_channels, block_in, 3, h, w, batch)
    flops += 2 * vae_resblock(block_in, block_in, h, w, batch) + vae_attention(block_in, h, w, batch)
    for i in reversed(range(len(cfg.ch_mult))):
        block_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            flops += vae_resblock(block_in if j == 0 else block_out, block_out, h, w, batch)
        block_in = block_out
        if i != 0:
            h, w = 2 * h, 2 * w
            flops += conv2d(block_in, block_in, 3, h, w, batch)
    return flops + conv2d(block_in, cfg.out_ch, 3, h, w, batch)


# ---- text encoders ---------------------------------------------------------------------------

def text_layer(cfg: TextEncoderConfig, batch: int) -> int:
    rows, length = batch * cfg.max_length, cfg.max_length
    return (4 * linear(cfg.width, cfg.width, rows) + attention(batch, length, length, cfg.width)
            + linear(cfg.width, cfg.mlp_width, rows) + linear(cfg.mlp_width, cfg.width, rows))


def text_encoder(cfg: TextEncoderConfig, batch: int, layers: Optional[int] = None,
                 project: bool = False) -> int:
    """`layers` transformer layers (default all) over 77 tokens; `project` adds the pooled
    output's projection (one row per sequence)."""
    n = cfg.layers if layers is None else layers
    flops = n * text_layer(cfg, batch)
    if project:
        flops += linear(cfg.width, cfg.projection_dim or cfg.width, batch)
    return flops


def encode_prompt(cfg: SDXLConfig, batch: int = TEXT_BATCH) -> int:
    """CLIP-L up to its penultimate layer, all of bigG and its pooled projection."""
    c = cfg.conditioner
    return (text_encoder(c.clip_l, batch, layers=c.clip_l.layers - 1)
            + text_encoder(c.clip_g, batch, project=True))


# ---- components ------------------------------------------------------------------------------

def component_flops(cfg: SDXLConfig, component: str, height: int, width: int,
                    steps: int = 4, guidance: bool = True) -> int:
    """FLOPs of one benchmarked call: `text` (prompt + negative), `unet` (one CFG step,
    batch 2), `vae` (decode one image), `pipeline` (text to image at `steps` steps)."""
    f = cfg.vae.downsample_factor
    lh, lw = height // f, width // f
    if component == "text":
        return encode_prompt(cfg)
    if component == "unet":
        return unet(cfg.unet, UNET_BATCH, lh, lw)
    if component == "vae":
        return vae_decode(cfg.vae, 1, lh, lw)
    if component == "pipeline":
        step = unet(cfg.unet, UNET_BATCH if guidance else 1, lh, lw)
        return encode_prompt(cfg) + steps * step + vae_decode(cfg.vae, 1, lh, lw)
    raise ValueError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")


def all_component_flops(cfg: SDXLConfig, height: int, width: int, steps: int = 4) -> Dict[str, int]:
    return {c: component_flops(cfg, c, height, width, steps) for c in COMPONENTS}


def flops_by_kind(cfg: SDXLConfig, component: str, height: int, width: int,
                  steps: int = 4) -> Dict[str, int]:
    """`component_flops` split into matmul (dense layers), attention and conv: the count is
    linear in each layer function's, so each kind is the count with only it counted."""
    saved = _counting[:]
    try:
        split = {}
        for kind in KINDS:
            _counting[:] = [kind]
            split[kind] = component_flops(cfg, component, height, width, steps)
        return split
    finally:
        _counting[:] = saved
