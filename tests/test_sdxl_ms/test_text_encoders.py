"""Text side parity: the port's CLIP-L, OpenCLIP-bigG and size embedders against transformers and
diffusers, with the same seeded weights carried over by the key rules (fp32, tiny preset)."""
import json
import math

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conftest import read_reference_keys
from sdxl_ms.config import SDXL_BASE, SMALL, TINY
from sdxl_ms.models.conditioner import GeneralConditioner
from sdxl_ms.tokenizer import load_tokenizer, tokenize
from sdxl_ms.weights.diffusers_configs import text_encoder_config
from sdxl_ms.weights.keymap import convert_to_diffusers, convert_to_sgm, sgm_layout_to_diffusers
from sdxl_ms.weights.keymap_text import (CLIP_G_SGM_ONLY, LOGIT_SCALE_INIT,
                                        canonical_text_encoder_key, clip_g_rules, clip_l_rules,
                                        is_text_buffer, sgm_only_tensor)
from sdxl_ms.weights.state import layout, named_parameters, randomize

TOL = 1e-5
PROMPTS = ["Astronaut in a jungle, cold color palette, muted colors, detailed, 8k", ""]
# which -> (embedder index, attribute holding the tower, transformers class, key rules)
ENCODERS = {
    "clip_l": (0, "transformer", CLIPTextModel, clip_l_rules),
    "clip_g": (1, "model", CLIPTextModelWithProjection, clip_g_rules),
}


def rel_err(port, ref) -> float:
    port = np.asarray(port.asnumpy() if isinstance(port, ms.Tensor) else port, np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert port.shape == ref.shape, (port.shape, ref.shape)
    return float(np.linalg.norm(port - ref) / np.linalg.norm(ref))


def sgm_prefix(which: str) -> str:
    index, attr = ENCODERS[which][:2]
    return f"embedders.{index}.{attr}."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny conditioner with seeded weights, both reference encoders loaded through
    `from_pretrained` from folders written with the key rules, and real token ids."""
    cfg = TINY.conditioner
    port = GeneralConditioner(cfg)
    randomize(port, seed=0, prefix="conditioner.")
    params = named_parameters(port)
    refs = {}
    for which, (_, _, cls, rules_fn) in ENCODERS.items():
        enc_cfg = getattr(cfg, which)
        folder = tmp_path_factory.mktemp(which)
        get = lambda n, p=sgm_prefix(which): params[p + n].asnumpy()  # noqa: E731
        save_file(dict(convert_to_diffusers(rules_fn(enc_cfg), get)),
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(text_encoder_config(enc_cfg)))
        model, info = cls.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert not info["mismatched_keys"], info
        refs[which] = model.eval()
    ids = {"clip_l": tokenize(load_tokenizer(cfg.clip_l.pad_token), PROMPTS),
           "clip_g": tokenize(load_tokenizer(cfg.clip_g.pad_token), PROMPTS)}
    assert ids["clip_l"][1, 2] == 49407 and ids["clip_g"][1, 2] == 0  # the two pad tokens
    with torch.no_grad():
        outs = {w: refs[w](torch.from_numpy(ids[w]), output_hidden_states=True) for w in refs}
    return {"cfg": cfg, "port": port, "refs": refs, "ids": ids, "outs": outs}


def run_with_activation(tiny, which, act):
    """The reference encoder of `tiny` rebuilt with another activation, same weights."""
    ref = tiny["refs"][which]
    cfg = CLIPTextConfig(**dict(text_encoder_config(getattr(tiny["cfg"], which)), hidden_act=act))
    model = type(ref)(cfg).eval()
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        return model(torch.from_numpy(tiny["ids"][which]), output_hidden_states=True)


def test_clip_l_matches_transformers(tiny):
    penultimate, last, pooled = tiny["port"].embedders[0].transformer(tiny["ids"]["clip_l"])
    ref = tiny["outs"]["clip_l"]
    errs = {"penultimate": rel_err(penultimate, ref.hidden_states[-2]),
            "last_hidden_state": rel_err(last, ref.last_hidden_state),
            "pooled": rel_err(pooled, ref.pooler_output)}
    print("clip-l rel L2:", errs)
    assert max(errs.values()) <= TOL, errs


def test_open_clip_matches_transformers(tiny):
    penultimate, pooled = tiny["port"].embedders[1].model(tiny["ids"]["clip_g"])
    ref = tiny["outs"]["clip_g"]
    errs = {"penultimate": rel_err(penultimate, ref.hidden_states[-2]),
            "text_embeds": rel_err(pooled, ref.text_embeds)}
    print("open-clip rel L2:", errs)
    assert max(errs.values()) <= TOL, errs


def test_conditioner_matches_diffusers_encode_prompt(tiny):
    """crossattn = concat(te1 hidden_states[-2], te2 hidden_states[-2]); vector =
    concat(text_embeds, add_time_proj(time_ids)) as diffusers' SDXL pipeline and UNet build them."""
    from diffusers.models.embeddings import Timesteps

    port, outs, cfg = tiny["port"], tiny["outs"], tiny["cfg"]
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [80, 48, 3, 5, 64, 64]], np.float32)
    crossattn, vector = port(tiny["ids"]["clip_l"], tiny["ids"]["clip_g"], time_ids)
    ref_ctx = torch.cat([outs["clip_l"].hidden_states[-2], outs["clip_g"].hidden_states[-2]], -1)
    time_proj = Timesteps(cfg.size_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    ref_vec = torch.cat([outs["clip_g"].text_embeds,
                         time_proj(torch.from_numpy(time_ids).flatten()).reshape(2, -1)], -1)
    assert tuple(crossattn.shape) == (2, 77, cfg.context_dim)
    assert tuple(vector.shape) == (2, cfg.vector_dim)
    errs = {"crossattn": rel_err(crossattn, ref_ctx), "vector": rel_err(vector, ref_vec)}
    print("conditioner rel L2:", errs)
    assert max(errs.values()) <= TOL, errs


def test_tolerance_catches_known_bugs(tiny):
    """Each classic porting slip lands far outside TOL with these weights and tokens."""
    pen_g, pooled_g = tiny["port"].embedders[1].model(tiny["ids"]["clip_g"])
    pen_l = tiny["port"].embedders[0].transformer.penultimate(tiny["ids"]["clip_l"])
    tanh_g = run_with_activation(tiny, "clip_g", "gelu_pytorch_tanh")  # MindSpore nn.GELU default
    erf_l = run_with_activation(tiny, "clip_l", "gelu")  # erf GELU where CLIP-L needs QuickGELU
    ref_g = tiny["refs"]["clip_g"]
    with torch.no_grad():
        eos_state = ref_g.text_model(torch.from_numpy(tiny["ids"]["clip_g"])).pooler_output
        untransposed = eos_state @ ref_g.text_projection.weight  # P copied without transpose
    errs = {"tanh_gelu_penultimate": rel_err(pen_g, tanh_g.hidden_states[-2]),
            "tanh_gelu_pooled": rel_err(pooled_g, tanh_g.text_embeds),
            "gelu_for_quick_gelu": rel_err(pen_l, erf_l.hidden_states[-2]),
            "untransposed_projection": rel_err(pooled_g, untransposed)}
    print("known-bug errors:", errs)
    assert min(errs.values()) > 1e-4, errs


# ---------------------------------------------------------------------------------------------
# names and shapes


def port_layouts(cfg):
    """The port's full conditioner layout and each encoder's part, without allocating weights."""
    with ms.nn.utils.no_init_parameters():
        port = GeneralConditioner(cfg)
    full = layout(port, "conditioner.")
    parts = {}
    for which in ENCODERS:
        prefix = "conditioner." + sgm_prefix(which)
        parts[which] = {k[len(prefix):]: s for k, s in full.items() if k.startswith(prefix)}
    return full, parts


def transformers_layout(which, enc_cfg):
    """transformers' names and shapes, on the meta device; CLIP-L keys in their on-disk spelling."""
    cls = ENCODERS[which][2]
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**text_encoder_config(enc_cfg)))
    fix = canonical_text_encoder_key if which == "clip_l" else (lambda k: k)
    return {fix(k): tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", [TINY, SMALL, SDXL_BASE], ids=lambda p: p.name)
@pytest.mark.parametrize("which", list(ENCODERS))
def test_rules_cover_port_and_transformers_exactly(preset, which):
    enc_cfg = getattr(preset.conditioner, which)
    _, parts = port_layouts(preset.conditioner)
    port = parts[which]
    rules = ENCODERS[which][3](enc_cfg)
    sgm_names = [n for r in rules for n in r.sgm]
    diffusers_names = [n for r in rules for n in r.diffusers]
    assert len(set(sgm_names)) == len(sgm_names)
    assert len(set(diffusers_names)) == len(diffusers_names)
    sgm_only = set(CLIP_G_SGM_ONLY) if which == "clip_g" else set()
    assert set(sgm_names) | sgm_only == set(port) and not set(sgm_names) & sgm_only
    assert sgm_layout_to_diffusers(rules, port) == transformers_layout(which, enc_cfg)
    assert not any(is_text_buffer(n) for n in list(port) + diffusers_names)


def test_sdxl_base_layout_equals_reference_checkpoint():
    full, _ = port_layouts(SDXL_BASE.conditioner)
    reference = list(read_reference_keys("conditioner.").items())
    assert len(reference) == 586
    assert list(full.items()) == reference  # names, shapes and checkpoint order


def test_rules_round_trip_and_saved_names(tiny, tmp_path):
    """sgm -> diffusers -> sgm is lossless; what transformers itself saves uses the rules' names
    (via canonical_text_encoder_key for CLIP-L); logit_scale gets open_clip's initial value."""
    params = named_parameters(tiny["port"])
    for which, (_, _, _, rules_fn) in ENCODERS.items():
        rules = rules_fn(getattr(tiny["cfg"], which))
        prefix = sgm_prefix(which)
        diff = dict(convert_to_diffusers(rules, lambda n: params[prefix + n].asnumpy()))
        for name, arr in convert_to_sgm(rules, diff.__getitem__):
            np.testing.assert_array_equal(arr, params[prefix + name].asnumpy())
        folder = tmp_path / which
        tiny["refs"][which].save_pretrained(str(folder))
        saved = load_file(str(folder / "model.safetensors"))
        fix = canonical_text_encoder_key if which == "clip_l" else (lambda k: k)
        assert {fix(k) for k in saved if not is_text_buffer(k)} == set(diff)
    scale = sgm_only_tensor("logit_scale")
    assert scale.shape == () and scale.dtype == np.float32
    assert abs(float(scale) - math.log(1 / 0.07)) < 1e-6 and LOGIT_SCALE_INIT == math.log(1 / 0.07)


# ---------------------------------------------------------------------------------------------
# size / crop embeddings


@pytest.mark.parametrize("preset", [TINY, SMALL, SDXL_BASE], ids=lambda p: p.name)
def test_embed_sizes_matches_diffusers_add_time_proj(preset):
    """Against diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)` applied
    to the flattened add_time_ids. Both sides compute in float32, where sin(1024 * f) turns the
    last-ulp rounding of each exp(f) into ~1e-6 relative error: diffusers' own distance from
    exact float64 math is that floor, so the port may be at most twice as far from diffusers."""
    from diffusers.models.embeddings import Timesteps

    dim = preset.conditioner.size_embed_dim
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [64, 64, 3, 5, 64, 64]], np.float32)
    with ms.nn.utils.no_init_parameters():
        port = GeneralConditioner(preset.conditioner).embed_sizes(time_ids)
    flat = torch.from_numpy(time_ids).flatten()

    def diffusers_proj(**kw):
        args = {"flip_sin_to_cos": True, "downscale_freq_shift": 0, **kw}
        return Timesteps(dim, **args)(flat).reshape(2, -1).numpy()

    ref = diffusers_proj()
    freqs = np.exp(-math.log(10000.0) * np.arange(dim // 2) / (dim // 2))
    angles = time_ids.reshape(-1, 1).astype(np.float64) * freqs
    exact = np.concatenate([np.cos(angles), np.sin(angles)], -1).reshape(2, -1)
    err, floor = rel_err(port, ref), rel_err(ref, exact)
    print(f"{preset.name}: embed_sizes rel L2 {err:.3g}, diffusers-vs-exact floor {floor:.3g}")
    assert tuple(port.shape) == (2, 6 * dim)
    assert err <= TOL and err <= 2 * floor
    # a sin-first or shifted-frequency embedding would be caught
    assert rel_err(port, diffusers_proj(flip_sin_to_cos=False)) > 1e-1
    assert rel_err(port, diffusers_proj(downscale_freq_shift=1)) > 1e-3
