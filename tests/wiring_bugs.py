"""Wiring bugs a port can have: every module computes what it should, but what flows between
modules (or out of the last one) is not what the reference feeds. Written as replacements of
the port's own functions, monkeypatched in by tests (never a product flag).

  clip_l_last_layer       CLIP-L's output taken after its last layer, not its penultimate
  big_g_pooled_last       bigG's pooled output taken at the last position, not at the EOS token
  skip_concat_order       the UNet's skip connection concatenated before h instead of after it
  vae_scale_multiplied    the latents multiplied by the VAE scale before decoding, not divided
  proj_out_transposed     the transformer stack's tokens reshaped from their transpose before
                          proj_out (a reshape where a transpose was meant)
  crossattn_big_g_first   the crossattn concatenated bigG's hidden state first, CLIP-L's second
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

import sdxl_ms.models.open_clip_text as open_clip_text
import sdxl_ms.models.unet as unet
from sdxl_ms.models.clip_text import CLIPTextTransformer
from sdxl_ms.models.conditioner import GeneralConditioner
from sdxl_ms.pipeline import SDXLPipeline


def clip_l_every_layer(self, p, ids, with_last: bool = True):
    b, length = ids.shape
    n = self.cfg.layers
    x = self.embeddings(p, ids).reshape(b * length, -1)
    pen = self.encoder(p, x, b, 0, n)  # the bug: n, not n - 1, layers
    last = self.final_layer_norm(p, pen)
    return pen.reshape(b, length, -1), last.reshape(b, length, -1)


def last_position(ids: Tensor) -> Tensor:
    return Tensor(np.full(ids.shape[0], ids.shape[-1] - 1, np.int32))


class _SkipFirstOps:
    """`ops` for unet.py with `cat([h, skip])` taken as `cat([skip, h])`."""

    def __getattr__(self, name):
        return getattr(ops, name)

    @staticmethod
    def cat(tensors, axis=0):
        return ops.cat(list(tensors)[::-1], axis=axis)


def decode_multiplying(self, latents):
    z = Tensor(np.asarray(latents, np.float32) * np.float32(self.cfg.vae.scale_factor))
    vae = self.decoding_vae()
    return vae.decode(z.astype(vae.dtype)).astype(ms.float32).asnumpy()


def spatial_transformer_reshaped(self, p, x, context):
    tokens = self.proj_in.from_channels_first(p, self.norm(p, x))
    context = context.reshape(-1, context.shape[-1])
    for block in self.transformer_blocks:
        tokens = block(p, tokens, context, x.shape[0])
    b = x.shape[0]
    length = tokens.shape[0] // b
    tokens = tokens.reshape(b, length, -1).transpose(0, 2, 1).reshape(b * length, -1)
    return self.proj_out.to_channels_first(p, tokens, x.shape) + x


BUGS: Dict[str, List[Tuple[object, str, Callable]]] = {
    "clip_l_last_layer": [(CLIPTextTransformer, "forward", clip_l_every_layer)],
    "big_g_pooled_last": [(open_clip_text, "eos_positions", last_position)],
    "skip_concat_order": [(unet, "ops", _SkipFirstOps())],
    "vae_scale_multiplied": [(SDXLPipeline, "decode", decode_multiplying)],
    "proj_out_transposed": [(unet.SpatialTransformer, "forward", spatial_transformer_reshaped)],
}


def inject(bug: str, setattr_) -> None:
    """Put `bug` into the port (`setattr_`: pytest's monkeypatch.setattr, to undo it)."""
    for owner, name, replacement in BUGS[bug]:
        setattr_(owner, name, replacement)


def encode_text_big_g_first(self, input_ids, input_ids_2):
    hidden_l = self.embedders[0](input_ids)
    hidden_g, pooled = self.embedders[1](input_ids_2)
    return ops.cat([hidden_g.astype(hidden_l.dtype), hidden_l], axis=-1), pooled


BUGS["crossattn_big_g_first"] = [(GeneralConditioner, "encode_text", encode_text_big_g_first)]
