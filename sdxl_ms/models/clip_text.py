"""CLIP ViT-L/14 text transformer in Hugging Face layout (sgm embedder 0).

sgm wraps a `transformers.CLIPTextModel`, so the checkpoint keeps Hugging Face names under
`conditioner.embedders.0.transformer.`; this module tree reproduces them (including the
k, v, q, out projection order of the state dict). The helpers at the top (causal mask, EOS
pooling, activation by name) are shared with the OpenCLIP tower.
"""
from __future__ import annotations

from typing import Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import TextEncoderConfig
from ..backend import run_graph, run_model
from ..nn.layers import (Embedding, LayerNorm, Linear, attention_t, gelu, layer_norm,
                         linear, linear_from_t, quick_gelu, weights_of)

ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def as_ids(ids) -> Tensor:
    """Token ids as an int32 Tensor (accepts numpy arrays, lists and Tensors)."""
    if isinstance(ids, Tensor):
        return ids.astype(ms.int32)
    return Tensor(np.asarray(ids, dtype=np.int32))


def eos_positions(ids: Tensor) -> Tensor:
    """Index of the first maximal id per row: the EOS token, which has the largest id (49407).

    A unique-score argmax, so ties (CLIP-L pads with EOS too) resolve to the first occurrence
    as torch.argmax does, whatever the backend's tie rule.
    """
    length = ids.shape[-1]
    rank = Tensor(np.arange(length - 1, -1, -1, dtype=np.int32))  # larger for earlier positions
    score = ids.astype(ms.int32) * length + rank
    return ops.argmax(score, dim=-1).astype(ms.int32)


def gather_rows(x: Tensor, positions: Tensor) -> Tensor:
    """x[b, positions[b]] for x (B, L, W) -> (B, W)."""
    b, length, width = x.shape
    flat = Tensor(np.arange(b, dtype=np.int32) * length) + positions
    return ops.gather(x.reshape(b * length, width), flat, 0)


class CLIPAttention(nn.Cell):
    """Weights only: the layer's forward is `_clip_layer`."""

    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        # creation order = Hugging Face state-dict order (k, v, q, out)
        self.k_proj = Linear(w, w, dtype=dtype)
        self.v_proj = Linear(w, w, dtype=dtype)
        self.q_proj = Linear(w, w, dtype=dtype)
        self.out_proj = Linear(w, w, dtype=dtype)


class CLIPMLP(nn.Cell):
    """Weights and activation only: the forward is `mlp`."""

    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = Linear(cfg.width, cfg.mlp_width, dtype=dtype)
        self.fc2 = Linear(cfg.mlp_width, cfg.width, dtype=dtype)


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.cfg = cfg
        self.self_attn = CLIPAttention(cfg, dtype)
        self.layer_norm1 = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)

    def run_tokens(self, x, batch: int):
        """The layer with causal self-attention on row-major tokens x (B*L, W): one graph in
        jit "blocks" mode."""
        a, m = self.self_attn, self.mlp
        w = weights_of(self, [self.layer_norm1.weight, self.layer_norm1.bias,
                              a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                              a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
                              a.out_proj.weight, a.out_proj.bias,
                              self.layer_norm2.weight, self.layer_norm2.bias,
                              m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias])
        return run_graph(_clip_layer, m.act, x, w, batch, self.cfg.heads,
                         (self.layer_norm1.eps, self.layer_norm2.eps))


def _clip_layer(act, x, w, batch: int, heads: int, eps):
    """Pre-LayerNorm transformer layer, causal self-attention, MLP; x (B*L, W) row-major."""
    h = layer_norm(x, w[0], w[1], eps[0])
    x = linear_from_t(attention_t(h, None, batch, heads, w[2], w[3], w[4], w[5], w[6], w[7],
                                  causal=True), w[8], w[9]) + x
    return mlp(layer_norm(x, w[10], w[11], eps[1]), w[12:16], act) + x


def mlp(x, w, act):
    """fc2(act(fc1(x))) on row-major tokens, w = (fc1 weight, bias, fc2 weight, bias)."""
    return linear(act(linear(x, w[0], w[1])), w[2], w[3])


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width, dtype=dtype)
        self.position_embedding = Embedding(cfg.max_length, cfg.width, dtype=dtype)

    def construct(self, ids):
        length = ids.shape[-1]
        return self.token_embedding(ids) + self.position_embedding.weight[:length]


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, dtype) for _ in range(cfg.layers)])


class CLIPTextTransformer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg, dtype)
        self.encoder = CLIPEncoder(cfg, dtype)
        self.final_layer_norm = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)


class CLIPTextModel(nn.Cell):
    """`transformers.CLIPTextModel` with parameter names under `text_model.`.

    `construct(ids)` returns (penultimate, last_hidden_state, pooled):
    penultimate is the hidden state after `layers - 1` layers with no final LayerNorm (what sgm
    and diffusers feed the UNet, diffusers' `hidden_states[-2]`); last_hidden_state has the
    final LayerNorm; pooled is last_hidden_state at the EOS position (argmax of the ids).
    """

    def __init__(self, cfg: TextEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg, dtype)

    def _tokens(self, ids, first: int, last: int, x=None):
        """Row-major hidden states (B*L, W) after layers [first, last) (from the embeddings
        when x is None)."""
        b = ids.shape[0]
        if x is None:
            x = self.text_model.embeddings(ids)
            x = x.reshape(-1, x.shape[-1])
        layers = self.text_model.encoder.layers
        for i in range(first, last):
            x = layers[i].run_tokens(x, b)
        return x

    def penultimate(self, ids) -> Tensor:
        """Only the (B, L, W) penultimate hidden state: skips the last layer's work."""
        return run_model(self, self._penultimate, as_ids(ids))

    def _penultimate(self, ids):
        x = self._tokens(ids, 0, self.cfg.layers - 1)
        return x.reshape(ids.shape[0], ids.shape[1], -1)

    def construct(self, ids) -> Tuple[Tensor, Tensor, Tensor]:
        return run_model(self, self._forward, as_ids(ids))

    def _forward(self, ids):
        b, length = ids.shape
        pen = self._tokens(ids, 0, self.cfg.layers - 1)
        last = self.text_model.final_layer_norm(
            self._tokens(ids, self.cfg.layers - 1, self.cfg.layers, pen)).reshape(b, length, -1)
        return pen.reshape(b, length, -1), last, gather_rows(last, eos_positions(ids))
