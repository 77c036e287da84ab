"""The two SDXL text towers, in the module trees sgm's checkpoint names them by.

embedders.0 (`FrozenCLIPEmbedder`) wraps Hugging Face's CLIPTextModel, so its names are
`transformer.text_model.{embeddings,encoder.layers.N,final_layer_norm}`; SDXL reads the hidden
state after the penultimate layer, without the final LayerNorm.
embedders.1 (`FrozenOpenCLIPEmbedder2`) keeps open_clip's names under `model.`: a fused
`attn.in_proj_weight` (q, k, v stacked), bare `positional_embedding`, `text_projection`
applied as x @ P, and the contrastive `logit_scale` SDXL never uses (held so the checkpoint
loads without unexpected keys). SDXL reads the penultimate hidden state and the pooled
`ln_final(last)[EOS] @ text_projection`.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .config import TextConfig
from .layers import ACTIVATIONS, F16, F32, LayerNorm, attention, causal_mask, dense


def eos_index(ids) -> Tensor:
    """First position of the largest id in each row (EOS, 49407), as torch.argmax resolves
    ties: CLIP-L pads with EOS, so the first one is meant. Made a unique maximum by adding a
    rank that favours earlier positions."""
    length = ids.shape[-1]
    rank = Tensor(np.arange(length - 1, -1, -1, dtype=np.int32))
    return ops.argmax(ids.astype(ms.int32) * length + rank, dim=-1)


def pick_rows(x, index):
    """x (B, L, W)[b, index[b]] -> (B, W)."""
    b, length, width = x.shape
    flat = Tensor(np.arange(b, dtype=np.int32) * length) + index.astype(ms.int32)
    return ops.gather(x.reshape(b * length, width), flat, 0)


# ---- CLIP-L (Hugging Face layout) --------------------------------------------------------------

class CLIPAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, softmax_dtype=F32):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.softmax_dtype = softmax_dtype
        self.k_proj = dense(w, w)
        self.v_proj = dense(w, w)
        self.q_proj = dense(w, w)
        self.out_proj = dense(w, w)

    def construct(self, x, mask):
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask,
                        self.softmax_dtype)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = dense(cfg.width, cfg.mlp_width)
        self.fc2 = dense(cfg.mlp_width, cfg.width)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, softmax_dtype=F32):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, softmax_dtype)
        self.layer_norm1 = LayerNorm(cfg.width, cfg.eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.width, cfg.eps)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def construct(self, ids):
        positions = Tensor(np.arange(ids.shape[-1], dtype=np.int32))
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: TextConfig, fp16_softmax_layer: int = -1):
        super().__init__()
        self.layers = nn.CellList([
            CLIPEncoderLayer(cfg, F16 if i == fp16_softmax_layer else F32)
            for i in range(cfg.layers)])


class CLIPTextTransformer(nn.Cell):
    def __init__(self, cfg: TextConfig, fp16_softmax_layer: int = -1):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, fp16_softmax_layer)
        self.final_layer_norm = LayerNorm(cfg.width, cfg.eps)


class CLIPTextModel(nn.Cell):
    def __init__(self, cfg: TextConfig, fp16_softmax_layer: int = -1):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg, fp16_softmax_layer)


class FrozenCLIPEmbedder(nn.Cell):
    """CLIP-L: (B, 77) ids -> the hidden state after layer `layers - 1`, (B, 77, W). The last
    layer and `final_layer_norm` are loaded but SDXL does not run them."""

    def __init__(self, cfg: TextConfig, fp16_softmax_layer: int = -1):
        super().__init__()
        self.cfg = cfg
        self.transformer = CLIPTextModel(cfg, fp16_softmax_layer)

    def construct(self, ids):
        tm = self.transformer.text_model
        x = tm.embeddings(ids)
        mask = causal_mask(ids.shape[-1])
        for i in range(self.cfg.layers - 1):
            x = tm.encoder.layers[i](x, mask)
        return x


# ---- OpenCLIP bigG (open_clip layout) ----------------------------------------------------------

def _param(shape, name: str) -> Parameter:
    return Parameter(initializer("zeros", shape, F32), name=name)


class MultiheadAttention(nn.Cell):
    """torch.nn.MultiheadAttention's parameters: in_proj (3W, W) rows q, k, v, and out_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = _param((3 * width, width), "in_proj_weight")
        self.in_proj_bias = _param((3 * width,), "in_proj_bias")
        self.out_proj = dense(width, width)

    def construct(self, x, mask):
        w = self.width
        wt, bias = self.in_proj_weight, self.in_proj_bias
        q = ops.matmul(x, wt[:w].T) + bias[:w]
        k = ops.matmul(x, wt[w:2 * w].T) + bias[w:2 * w]
        v = ops.matmul(x, wt[2 * w:].T) + bias[2 * w:]
        return self.out_proj(attention(q, k, v, self.heads, mask))


class OpenCLIPMLP(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.c_fc = dense(cfg.width, cfg.mlp_width)
        self.c_proj = dense(cfg.mlp_width, cfg.width)

    def construct(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, cfg.eps)
        self.attn = MultiheadAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, cfg.eps)
        self.mlp = OpenCLIPMLP(cfg)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])


class OpenCLIPText(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transformer = Transformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = _param((cfg.max_length, cfg.width), "positional_embedding")
        self.ln_final = LayerNorm(cfg.width, cfg.eps)
        self.text_projection = _param((cfg.width, cfg.projection_dim), "text_projection")
        self.logit_scale = _param((), "logit_scale")


class FrozenOpenCLIPEmbedder2(nn.Cell):
    """bigG: (B, 77) ids -> (penultimate hidden state (B, 77, W), pooled (B, P))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = OpenCLIPText(cfg)

    def construct(self, ids):
        m = self.model
        length = ids.shape[-1]
        x = m.token_embedding(ids) + m.positional_embedding[:length]
        mask = causal_mask(length)
        n = self.cfg.layers
        for i in range(n - 1):
            x = m.transformer.resblocks[i](x, mask)
        penultimate = x
        last = m.ln_final(m.transformer.resblocks[n - 1](x, mask))
        pooled = ops.matmul(pick_rows(last, eos_index(ids)), m.text_projection.astype(last.dtype))
        return penultimate, pooled
