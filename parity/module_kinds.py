"""What a module is, read from the reference side: the kind that names its bounds in the policy
(`[module.<dtype>]`, `[module_truth.<dtype>]`) and its rows in a module table.

A port's classes are its own (stock `nn.Dense`, sgm's `CrossAttention`, anything); the
reference's are fixed by diffusers and transformers. So a module's kind comes from its
reference counterpart's class and the network it sits in, spelled as sgm names the module
(the layout every MindSpore SDXL port follows): diffusers' `Attention` is a `CrossAttention`
in the UNet and an `AttnBlock` in the VAE, bigG's `CLIPEncoderLayer` is open_clip's
`ResidualAttentionBlock`. Reference modules of no kind here (containers, activations, dropout)
are not compared on their own: their layers are.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

# the networks of the reference pipeline a module can sit in
NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae")

_EVERYWHERE: Dict[str, str] = {
    "Linear": "Linear", "Conv2d": "Conv2d", "GroupNorm": "GroupNorm", "LayerNorm": "LayerNorm",
    "Embedding": "Embedding", "Downsample2D": "Downsample", "Upsample2D": "Upsample",
}
_BY_NETWORK: Dict[Tuple[str, str], str] = {
    ("text_encoder", "CLIPTextEmbeddings"): "CLIPTextEmbeddings",
    ("text_encoder", "CLIPEncoderLayer"): "CLIPEncoderLayer",
    ("text_encoder", "CLIPAttention"): "CLIPAttention",
    ("text_encoder", "CLIPMLP"): "CLIPMLP",
    ("text_encoder_2", "CLIPEncoderLayer"): "ResidualAttentionBlock",
    ("text_encoder_2", "CLIPAttention"): "MultiheadAttention",
    ("text_encoder_2", "CLIPMLP"): "MLP",
    ("unet", "Timesteps"): "SinusoidalTimesteps",
    ("unet", "ResnetBlock2D"): "ResBlock",
    ("unet", "Transformer2DModel"): "SpatialTransformer",
    ("unet", "BasicTransformerBlock"): "BasicTransformerBlock",
    ("unet", "Attention"): "CrossAttention",
    ("unet", "FeedForward"): "FeedForward",
    ("unet", "GEGLU"): "GEGLU",
    ("vae", "ResnetBlock2D"): "ResnetBlock",
    ("vae", "Attention"): "AttnBlock",
    ("vae", "UNetMidBlock2D"): "MidBlock",
    ("vae", "UpDecoderBlock2D"): "Level",
    ("vae", "DownEncoderBlock2D"): "Level",
    ("vae", "Decoder"): "Decoder",
    # sgm's VAE attention holds q, k, v and proj_out as 1x1 convolutions
    ("vae", "Linear"): "Conv2d",
}
# kinds whose main input is token ids, not activations
TOKEN_ID_KINDS = ("Embedding", "CLIPTextEmbeddings")

# An attention module's core (scores, softmax, the product with v) as its own row: its
# projections' children as the reference names them, q, k, v (whose outputs are the core's
# inputs) and the output projection (whose input is the core's output). A softmax computed in
# float16 moves a whole attention module's error only 1.1-1.2x, because its four projections
# round more than its core does, but the core's own error 1.5x at the seeded weights' flat
# attention and up to 6x at peakier logits (docs/precision-at-real-widths.md).
ATTENTION_PARTS: Dict[str, Tuple[str, str, str, str]] = {
    "CLIPAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "MultiheadAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "CrossAttention": ("to_q", "to_k", "to_v", "to_out.0"),
    "AttnBlock": ("to_q", "to_k", "to_v", "to_out.0"),
}
CORE_SUFFIX = "Core"  # an attention core's kind: its module's kind + "Core" ("CLIPAttentionCore")
CORE_TENSORS = ("q", "k", "v", "core")  # what the capture holds of a core, "core" its output


def core_kind(kind: str) -> str:
    return kind + CORE_SUFFIX


def is_core_kind(kind: str) -> bool:
    return kind.endswith(CORE_SUFFIX) and kind[:-len(CORE_SUFFIX)] in ATTENTION_PARTS


def network_of(reference_name: str) -> str:
    """"unet/down_blocks.1..." -> "unet"."""
    return reference_name.partition("/")[0]


def kind_of(reference_name: str, reference_class: str) -> Optional[str]:
    """The kind of the reference module `reference_name` ("component/dotted.name") of class
    `reference_class`, or None for one that is not compared on its own."""
    network = network_of(reference_name)
    return _BY_NETWORK.get((network, reference_class)) or _EVERYWHERE.get(reference_class)
