"""CLIP ViT-L/14 text transformer in Hugging Face layout (sgm embedder 0).

sgm wraps a `transformers.CLIPTextModel`, so the checkpoint keeps Hugging Face names under
`conditioner.embedders.0.transformer.`; this module tree reproduces them (including the
k, v, q, out projection order of the state dict). The helpers at the top (EOS pooling,
activation by name) are shared with the OpenCLIP tower.
"""
from __future__ import annotations

from typing import Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import TextEncoderConfig
from ..nn.layers import (Embedding, LayerNorm, Linear, attend_projections_t, attention_t,
                         gelu, quick_gelu)
from ..nn.module import Module, Network, run_model

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


class CLIPAttention(Module):
    """Causal multi-head self-attention of row-major tokens (B*L, W). The heads' outputs come
    out transposed, so `out_proj` applies without a copy (`Linear.from_transposed`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        # creation order = Hugging Face state-dict order (k, v, q, out)
        self.k_proj = Linear(w, w)
        self.v_proj = Linear(w, w)
        self.q_proj = Linear(w, w)
        self.out_proj = Linear(w, w)

    def forward(self, p, x, batch: int):
        if self.observing:  # watched (a class constant graph mode folds): q, k, v via the children
            heads_t = attend_projections_t(self.q_proj.transposed_out(p, x),
                                           self.k_proj.transposed_out(p, x),
                                           self.v_proj.transposed_out(p, x),
                                           batch, self.heads, causal=True)
            return self.out_proj.from_transposed(p, heads_t)
        q, k, v = p["q_proj"], p["k_proj"], p["v_proj"]
        heads_t = attention_t(x, None, batch, self.heads, q["weight"], k["weight"], v["weight"],
                              q["bias"], k["bias"], v["bias"], causal=True)
        return self.out_proj.from_transposed(p, heads_t)


class CLIPMLP(Module):
    """fc2(act(fc1(x))); `act` is QuickGELU for CLIP-L."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = Linear(cfg.width, cfg.mlp_width)
        self.fc2 = Linear(cfg.mlp_width, cfg.width)

    def forward(self, p, x):
        return self.fc2(p, self.act(self.fc1(p, x)))


class CLIPEncoderLayer(Module):
    """Pre-LayerNorm transformer layer on row-major tokens (B*L, W): causal self-attention,
    then the MLP, each residual. One shared graph per structure in "blocks" mode."""

    graph_unit = True

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.width, cfg.layer_norm_eps)

    def forward(self, p, x, batch: int):
        x = self.self_attn(p, self.layer_norm1(p, x), batch) + x
        return self.mlp(p, self.layer_norm2(p, x)) + x


class CLIPTextEmbeddings(Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = Embedding(cfg.max_length, cfg.width)

    def forward(self, p, ids):
        length = ids.shape[-1]
        return (self.token_embedding(p, ids)
                + p["position_embedding"]["weight"][:length])


class CLIPEncoder(Module):
    """The layers [first, last) on row-major tokens (B*L, W)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])

    def forward(self, p, x, batch: int, first: int, last: int):
        for i in range(first, last):
            x = self.layers[i](p, x, batch)
        return x


class CLIPTextTransformer(Module):
    """Embeddings, encoder layers, final LayerNorm (`text_model` in Hugging Face's names).
    Returns the penultimate hidden state (no final norm) and the normed last one, (B, L, W)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.width, cfg.layer_norm_eps)

    def forward(self, p, ids, with_last: bool = True):
        b, length = ids.shape
        n = self.cfg.layers
        x = self.embeddings(p, ids).reshape(b * length, -1)
        pen = self.encoder(p, x, b, 0, n - 1)
        if not with_last:
            return pen.reshape(b, length, -1), None
        last = self.encoder(p, pen, b, n - 1, n)
        last = self.final_layer_norm(p, last)
        return pen.reshape(b, length, -1), last.reshape(b, length, -1)


class CLIPTextModel(Network):
    """`transformers.CLIPTextModel` with parameter names under `text_model.`.

    `construct(ids)` returns (penultimate, last_hidden_state, pooled):
    penultimate is the hidden state after `layers - 1` layers with no final LayerNorm (what sgm
    and diffusers feed the UNet, diffusers' `hidden_states[-2]`); last_hidden_state has the
    final LayerNorm; pooled is last_hidden_state at the EOS position (argmax of the ids).
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def penultimate(self, ids) -> Tensor:
        """Only the (B, L, W) penultimate hidden state: skips the last layer's work."""
        return run_model(self, self._penultimate, as_ids(ids))

    def _penultimate(self, ids):
        p = self  # the weights are the model's own (see sdxl_ms.nn.module)
        return self.text_model(p, ids, False)[0]

    def construct(self, ids) -> Tuple[Tensor, Tensor, Tensor]:
        return run_model(self, self.forward, as_ids(ids))

    def forward(self, ids):
        p = self
        pen, last = self.text_model(p, ids)
        return pen, last, gather_rows(last, eos_positions(ids))
