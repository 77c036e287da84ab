"""Typed configs to diffusers/transformers config files and back: JSON-ready dicts, no torch.

The forward direction is what `make-checkpoint --format diffusers` writes and what the
reference loads, so a preset's structure is stated once (in `sdxl_ms.config`) and translated
here. The way back builds the typed configs of a diffusers folder whose widths match no preset,
so such a checkpoint loads from its own config files.
"""
from __future__ import annotations

from typing import Dict, Tuple

from ..config import ConditionerConfig, SDXLConfig, TextEncoderConfig, UNetConfig, VAEConfig

DIFFUSERS_VERSION = "0.42.1"

# diffusers' SDXL-base scheduler configuration (EulerDiscreteScheduler, "leading", offset 1)
SDXL_SCHEDULER_CONFIG: Dict = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def unet_config(cfg: UNetConfig, size_embed_dim: int, sample_size: int = 128) -> Dict:
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in cfg.transformer_depth]
    up = ["CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in reversed(cfg.transformer_depth)]
    if cfg.transformer_depth_middle != cfg.transformer_depth[-1]:
        raise ValueError("diffusers ties the middle transformer depth to the last level's")
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,  # latent size; the pipeline's default image is 8x this
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        # levels without attention still need a placeholder depth of 1 in diffusers' config
        "transformer_layers_per_block": [max(d, 1) for d in cfg.transformer_depth],
        "attention_head_dim": [cfg.heads(c) for c in channels],  # diffusers: head *count*
        "use_linear_projection": True,
        "upcast_attention": False,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": size_embed_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "resnet_time_scale_shift": "default",
        "class_embed_type": None,
        "num_class_embeds": None,
        "dual_cross_attention": False,
        "only_cross_attention": False,
    }


def vae_config(cfg: VAEConfig) -> Dict:
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 1024,
        "scaling_factor": cfg.scale_factor,
        "force_upcast": True,
    }


def text_encoder_config(cfg: TextEncoderConfig) -> Dict:
    """transformers CLIPTextConfig; with a projection it is CLIPTextModelWithProjection's."""
    out = {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_length,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim or cfg.width,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        # SDXL's released configs keep these legacy ids; eos 2 makes transformers pool at
        # argmax(input_ids), the EOS position, exactly like open_clip and sgm.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    return out


def model_index(force_zeros_for_empty_prompt: bool = True) -> Dict:
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def pipeline_configs(cfg: SDXLConfig) -> Dict[str, Dict]:
    """Config JSON per diffusers component folder."""
    return {
        "unet": unet_config(cfg.unet, cfg.conditioner.size_embed_dim,
                            cfg.default_size // cfg.vae.downsample_factor),
        "vae": vae_config(cfg.vae),
        "text_encoder": text_encoder_config(cfg.conditioner.clip_l),
        "text_encoder_2": text_encoder_config(cfg.conditioner.clip_g),
        "scheduler": dict(SDXL_SCHEDULER_CONFIG),
    }


# ---- the way back: typed configs from a diffusers folder's config files ------------------------


def unet_config_from_diffusers(d: Dict) -> Tuple[UNetConfig, int]:
    """(UNetConfig, size_embed_dim) from a diffusers `unet/config.json` of SDXL's structure."""
    channels = list(d["block_out_channels"])
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    levels = len(channels)
    per_level = d.get("transformer_layers_per_block", 1)
    per_level = [per_level] * levels if isinstance(per_level, int) else list(per_level)
    depth = tuple(per_level[i] if "CrossAttn" in d["down_block_types"][i] else 0
                  for i in range(levels))
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers: head counts
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    head_dims = {channels[i] // heads[i] for i in range(levels) if depth[i]}
    if len(head_dims) > 1:
        raise ValueError(f"per-level head widths {sorted(head_dims)} differ; the port's UNet "
                         "uses one head width")
    if not d.get("use_linear_projection", False):
        raise ValueError("use_linear_projection is false: SDXL's UNet uses linear projections")
    cfg = UNetConfig(
        model_channels=mc, channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=d["layers_per_block"], transformer_depth=depth,
        transformer_depth_middle=depth[-1], num_head_channels=head_dims.pop() if head_dims else 64,
        context_dim=d["cross_attention_dim"],
        adm_in_channels=d["projection_class_embeddings_input_dim"],
        in_channels=d["in_channels"], out_channels=d["out_channels"],
        norm_groups=d["norm_num_groups"])
    return cfg, d["addition_time_embed_dim"]


def vae_config_from_diffusers(d: Dict) -> VAEConfig:
    """VAEConfig from a diffusers `vae/config.json`."""
    channels = list(d["block_out_channels"])
    ch = channels[0]
    return VAEConfig(ch=ch, ch_mult=tuple(c // ch for c in channels),
                     num_res_blocks=d["layers_per_block"], z_channels=d["latent_channels"],
                     in_channels=d["in_channels"], out_ch=d["out_channels"],
                     scale_factor=d["scaling_factor"], norm_groups=d["norm_num_groups"])


def text_encoder_config_from_transformers(d: Dict, pad_token: str) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers CLIPTextConfig (`text_encoder*/config.json`)."""
    with_projection = "CLIPTextModelWithProjection" in d.get("architectures", [])
    return TextEncoderConfig(
        width=d["hidden_size"], layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
        mlp_width=d["intermediate_size"], activation=d["hidden_act"], pad_token=pad_token,
        projection_dim=d.get("projection_dim") if with_projection else None,
        vocab_size=d["vocab_size"], max_length=d["max_position_embeddings"],
        layer_norm_eps=d["layer_norm_eps"])


def sdxl_config_from_diffusers(configs: Dict[str, Dict], pad_tokens: Tuple[str, str],
                               name: str) -> SDXLConfig:
    """The SDXLConfig of a diffusers SDXL folder: `configs` maps unet, vae, text_encoder and
    text_encoder_2 to their parsed config.json; `pad_tokens` are the two tokenizers'."""
    unet, size_embed_dim = unet_config_from_diffusers(configs["unet"])
    vae = vae_config_from_diffusers(configs["vae"])
    conditioner = ConditionerConfig(
        clip_l=text_encoder_config_from_transformers(configs["text_encoder"], pad_tokens[0]),
        clip_g=text_encoder_config_from_transformers(configs["text_encoder_2"], pad_tokens[1]),
        size_embed_dim=size_embed_dim)
    return SDXLConfig(name=name, conditioner=conditioner, unet=unet, vae=vae,
                      default_size=configs["unet"].get("sample_size", 128) * vae.downsample_factor)
