"""UNet: port vs diffusers UNet2DConditionModel on the same weights, and the key map."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from mindspore.nn.utils import no_init_parameters

from conftest import read_reference_keys, rel_l2
from sdxl_ms.runtime import init_runtime
from sdxl_ms.config import SDXL_BASE, SMALL, TINY
from sdxl_ms.models.unet import UNetModel
from sdxl_ms.nn.layers import timestep_embedding
from sdxl_ms.weights.diffusers_configs import unet_config
from sdxl_ms.weights.keymap import convert_to_diffusers, sgm_layout_to_diffusers
from sdxl_ms.weights.keymap_unet import unet_rules
from sdxl_ms.weights.state import layout, named_parameters, randomize

PREFIX = "model.diffusion_model."


def diffusers_unet(cfg):
    kwargs = {k: v for k, v in unet_config(cfg.unet, cfg.conditioner.size_embed_dim).items()
              if not k.startswith("_")}
    return UNet2DConditionModel(**kwargs).eval()


@pytest.fixture(scope="module")
def tiny_pair():
    init_runtime()
    port = UNetModel(TINY.unet)
    randomize(port, 0, PREFIX)
    params = named_parameters(port)
    ref = diffusers_unet(TINY)
    sd = dict(convert_to_diffusers(unet_rules(TINY.unet), lambda n: params[n].asnumpy()))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return port, ref


@pytest.mark.parametrize("timestep", [999.0, 501.0, 1.0])
def test_tiny_unet_matches_diffusers(tiny_pair, timestep):
    port, ref = tiny_pair
    rng = np.random.default_rng(int(timestep))
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, TINY.unet.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, TINY.conditioner.pooled_dim)).astype(np.float32)
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [48, 80, 3, 5, 64, 64]], np.float32)
    t = np.full((2,), timestep, np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(ctx),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                      "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    sizes = timestep_embedding(ms.Tensor(time_ids.reshape(-1)), TINY.conditioner.size_embed_dim)
    y = np.concatenate([pooled, sizes.asnumpy().reshape(2, -1)], axis=1)
    got = port(ms.Tensor(x), ms.Tensor(t), ms.Tensor(ctx), ms.Tensor(y)).asnumpy()
    assert want.std() > 0.1  # a live signal, not a collapsed output
    assert rel_l2(got, want) <= 1e-5


def test_tiny_rules_cover_both_module_trees(tiny_pair):
    port, ref = tiny_pair
    rules = unet_rules(TINY.unet)
    port_layout = layout(port)
    assert sorted(n for r in rules for n in r.sgm) == sorted(port_layout)
    mapped = sgm_layout_to_diffusers(rules, port_layout)
    assert mapped == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_sdxl_base_unet_layout_matches_public_checkpoint():
    with no_init_parameters():
        port = UNetModel(SDXL_BASE.unet)
    got = layout(port, PREFIX)
    want = {k: v for k, v in read_reference_keys().items() if k.startswith(PREFIX)}
    assert len(want) == 1680
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) == 2_567_463_684


@pytest.mark.parametrize("cfg", [SMALL, SDXL_BASE], ids=lambda c: c.name)
def test_rules_match_diffusers_names_and_shapes(cfg):
    with no_init_parameters():
        port = UNetModel(cfg.unet)
    with torch.device("meta"):
        ref = diffusers_unet(cfg)
    mapped = sgm_layout_to_diffusers(unet_rules(cfg.unet), layout(port))
    assert mapped == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
