"""Layers with PyTorch-style parameter names, so checkpoint keys map one to one.

MindSpore's own `nn` layers name norm parameters gamma/beta, default GELU to tanh, pick other
epsilons and pad convolutions 'same' by default (docs/porting-notes.md, section 4); these small cells make
every such choice explicit. Parameters are created uninitialised-zero: weights always come from
a checkpoint or from `sdxl_ms.weights.random_init`.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..backend import conv_impl, jit_enabled


def new_parameter(shape, dtype) -> Parameter:
    return Parameter(initializer("zeros", tuple(shape), dtype))


# GEMMs with the transposes folded into the kernel's operand packing: on MindSpore 2.10's CPU
# backend a transposed or sliced *view* is made contiguous by a copy that runs at ~25 ns per
# element (*measured*: as slow as the GEMM it feeds), so layouts are chosen such that every
# transpose lands in a MatMul flag and every slice is a contiguous block of leading-axis rows.
_MM = ops.MatMul()
_MM_NT = ops.MatMul(transpose_b=True)  # a @ b.T
_MM_TT = ops.MatMul(transpose_a=True, transpose_b=True)  # a.T @ b.T
_BMM_TN = ops.BatchMatMul(transpose_a=True)
_BMM_NT = ops.BatchMatMul(transpose_b=True)


def add_rows(y, bias):
    """y (R, N) + bias[:, None], or y (B, R, ...) + bias over axis 1, with BiasAdd.

    *Measured*: broadcasting `+` is ~10-40x slower than a same-shape add on CPU; BiasAdd is not.
    """
    if y.ndim == 2:
        return ops.bias_add(y.reshape((1,) + y.shape), bias).reshape(y.shape)
    return ops.bias_add(y, bias)


def linear(x2d, weight, bias=None):
    """Row-major tokens (N, in) -> (N, out), PyTorch weight layout (out, in)."""
    y = _MM_NT(x2d, weight)
    return y if bias is None else ops.bias_add(y, bias)


def linear_t(x2d, weight, bias=None):
    """(N, in) -> the transposed output (out, N): heads and GEGLU halves become row blocks."""
    y = _MM_NT(weight, x2d)
    return y if bias is None else add_rows(y, bias)


def linear_from_t(y_t, weight, bias=None):
    """Transposed activations (in, N) -> row-major (N, out)."""
    y = _MM_TT(y_t, weight)
    return y if bias is None else ops.bias_add(y, bias)


class Linear(nn.Cell):
    """y = x W^T + b, W stored (out, in) as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_parameter((out_features, in_features), dtype)
        self.bias = new_parameter((out_features,), dtype) if bias else None

    def construct(self, x):
        lead = x.shape[:-1]
        y = linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(lead + (self.out_features,))


class Conv2d(nn.Cell):
    """NCHW convolution with symmetric zero padding, PyTorch weight layout (O, I, kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = new_parameter((out_channels, in_channels, kernel_size, kernel_size), dtype)
        self.bias = new_parameter((out_channels,), dtype) if bias else None

    def construct(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


def conv2d(x, weight, bias=None, stride: int = 1, padding: int = 0):
    """NCHW convolution (PyTorch weight layout) plus `bias`: an (O,) vector, a (B*O,) one (one
    bias per image and channel, e.g. the ResBlock's conv bias + time embedding) or None.
    The kernel is `backend.conv_impl()`'s."""
    b, o = x.shape[0], weight.shape[0]
    per_image = bias is not None and bias.shape[0] != o
    channel_bias = None if per_image else bias
    if _CONV_IMPL.get() == "native":
        y = ops.conv2d(x, weight, channel_bias, stride=stride, pad_mode="pad", padding=padding)
    else:
        if weight.shape[2] == 1 and stride == 1 and padding == 0:
            y = _conv1x1(x, weight)
        else:
            y = _conv_im2col(x, weight, stride, padding)
        if channel_bias is not None:
            y = ops.bias_add(y, channel_bias)
    if not per_image:
        return y
    h, w = y.shape[2], y.shape[3]
    return ops.bias_add(y.reshape(1, b * o, h, w), bias).reshape(b, o, h, w)


class _Resolved:
    """`backend.conv_impl()` read once, so graph mode sees a constant."""

    def __init__(self):
        self.value = None

    def get(self):
        if self.value is None:
            self.value = conv_impl()
        return self.value


_CONV_IMPL = _Resolved()


def _per_image_matmul(w2d, cols):
    """w2d (O, K) @ cols[i] (K, L) for each image: 2-D MatMuls (*measured* faster than the
    broadcasting batched matmul, which copies the weight per image)."""
    if cols.shape[0] == 1:
        return _MM(w2d, cols[0]).reshape((1,) + w2d.shape[:1] + cols.shape[2:])
    return ops.stack([_MM(w2d, cols[i]) for i in range(cols.shape[0])])


def _conv1x1(x, weight):
    b, c, h, w = x.shape
    out = _per_image_matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, h * w))
    return out.reshape(b, weight.shape[0], h, w)


def _conv_im2col(x, weight, stride: int, padding: int):
    """Convolution as the Im2Col kernel (unfold) plus one MatMul per image."""
    o, c, kh, kw = weight.shape
    b, _, h, w = x.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    cols = ops.unfold(x, (kh, kw), dilation=1, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    out = _per_image_matmul(weight.reshape(o, c * kh * kw), cols)
    return out.reshape(b, o, ho, wo)


def group_norm(x, groups: int, weight, bias, eps: float):
    """GroupNorm in float32 whatever the dtypes. ops.group_norm: *measured* 7x faster than
    composing mean/var on CPU, same rounding."""
    if x.dtype == ms.float32 and weight.dtype == ms.float32:
        return ops.group_norm(x, groups, weight, bias, eps)
    y = ops.group_norm(x.astype(ms.float32), groups, weight.astype(ms.float32),
                       bias.astype(ms.float32), eps)
    return y.astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _layer_norm_kernel(eps: float):
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis in float32, with the fused kernel (*measured* 5-12x faster
    than composing mean/var on CPU)."""
    kernel = _layer_norm_kernel(eps)
    if x.dtype == ms.float32 and weight.dtype == ms.float32:
        return kernel(x, weight, bias)[0]
    y = kernel(x.astype(ms.float32), weight.astype(ms.float32), bias.astype(ms.float32))[0]
    return y.astype(x.dtype)


class GroupNorm(nn.Cell):
    """GroupNorm computed in float32 whatever the parameter dtype."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, dtype=ms.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = new_parameter((num_channels,), dtype)
        self.bias = new_parameter((num_channels,), dtype)

    def construct(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter((dim,), dtype)
        self.bias = new_parameter((dim,), dtype)

    def construct(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


def weights_of(cell: nn.Cell, params) -> tuple:
    """The weights a block function takes: the Parameters themselves in PyNative, plain-Tensor
    views of them (`tensors`) when blocks run as compiled graphs."""
    return tensors(cell, params) if jit_enabled() else tuple(params)


def tensors(cell: nn.Cell, params) -> tuple:
    """Plain-Tensor views of `params` (Parameters of `cell`, or None), to hand to a graph
    function: a graph compiled for one layer then serves every layer with the same shapes
    (*measured*: Parameters as ms.jit arguments key a fresh ~1 s compile per layer). Cached on
    the cell until a Parameter's storage changes (set_data replaces it)."""
    key = tuple(0 if p is None else p.data_ptr() for p in params)
    cached = cell.__dict__.get("_sdxl_tensor_views")
    if cached is None or cached[0] != key:
        cached = (key, tuple(None if p is None else Tensor(p) for p in params))
        object.__setattr__(cell, "_sdxl_tensor_views", cached)
    return cached[1]


class Embedding(nn.Cell):
    def __init__(self, num_embeddings: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = new_parameter((num_embeddings, dim), dtype)

    def construct(self, ids):
        return ops.gather(self.weight, ids.astype(ms.int32), 0)


def silu(x):
    """x * sigmoid(x) as one kernel (*measured* ~1.5x faster than the two-op form on CPU)."""
    return ops.silu(x)


class SiLU(nn.Cell):
    """Parameter-free cell, so sgm's Sequential indices (e.g. `out.2`) line up."""

    def construct(self, x):
        return silu(x)


class Identity(nn.Cell):
    def construct(self, x):
        return x


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling of NCHW, exact. *Measured* on CPU: two repeat_interleave
    copies are 1.5-4x faster than the nearest `interpolate` kernel."""
    return ops.repeat_interleave(ops.repeat_interleave(x, 2, 3), 2, 2)


class Upsample(nn.Cell):
    """Nearest 2x then a 3x3 conv named `conv`: the same block in sgm's UNet and VAE."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        return self.conv(upsample_nearest2x(x))


def gelu(x):
    """Exact (erf) GELU, as PyTorch's default; MindSpore's nn.GELU defaults to tanh."""
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def quick_gelu(x):
    """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


def attention_heads_t(q_t, k_t, v_t, heads: int, mask: Optional[Tensor] = None):
    """Scaled dot-product attention of one image in transposed layout.

    q_t (heads*d, L), k_t and v_t (heads*d, Lk) -> out_t (heads*d, L). Each head is a block of
    rows, so q^T k and v p^T are BatchMatMuls with transpose flags and no tensor is copied.
    `mask` is additive, (heads, L, Lk) (or broadcastable to it). Softmax runs in float32.
    """
    inner, length = q_t.shape
    d = inner // heads
    scores = _BMM_TN(q_t.reshape(heads, d, length), k_t.reshape(heads, d, k_t.shape[1]))
    if scores.dtype != ms.float32:
        scores = scores.astype(ms.float32)
    scores = scores * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores, axis=-1)
    if probs.dtype != v_t.dtype:
        probs = probs.astype(v_t.dtype)
    out = _BMM_NT(v_t.reshape(heads, d, v_t.shape[1]), probs)
    return out.reshape(inner, length)


def attention_t(x, context, batch: int, heads: int, wq, wk, wv, bq=None, bk=None, bv=None,
                causal: bool = False, per_image: Optional[bool] = None):
    """Multi-head attention of row-major tokens x (B*L, C) over context (B*Lk, Cc), or over
    themselves when `context` is None; q/k/v weights in PyTorch layout (inner, C). `causal`:
    position i sees keys <= i (text encoders).

    Returns the heads' outputs transposed, (inner, B*L): `linear_from_t` applies the output
    projection without a copy. By default all images go through one set of kernels
    (`attend_t`); `per_image=True` loops over the images instead, which does B-fold less
    softmax work but launches B times the kernels (the default picks by size).
    """
    length = x.shape[0] // batch
    ctx = x if context is None else context
    ctx_len = ctx.shape[0] // batch
    if per_image is None:
        per_image = batch > 1 and heads * length * ctx_len * batch * batch > _BATCHED_SCORES_MAX
    if not per_image:
        return attend_t(linear_t(x, wq, bq), linear_t(ctx, wk, bk), linear_t(ctx, wv, bv),
                        batch, heads, causal)
    outs = []
    for i in range(batch):
        xb = x[i * length:(i + 1) * length]
        cb = xb if context is None else ctx[i * ctx_len:(i + 1) * ctx_len]
        outs.append(attend_t(linear_t(xb, wq, bq), linear_t(cb, wk, bk), linear_t(cb, wv, bv),
                             1, heads, causal))
    return ops.cat(outs, axis=1)


def attend_t(q_t, k_t, v_t, batch: int, heads: int, causal: bool = False):
    """Attention of B images at once in transposed layout: q_t (inner, B*L), k_t and v_t
    (inner, B*Lk) -> (inner, B*L). An additive block-diagonal mask keeps each image's queries on
    its own keys (exact: the masked probabilities underflow to 0)."""
    length, ctx_len = q_t.shape[1] // batch, k_t.shape[1] // batch
    return attention_heads_t(q_t, k_t, v_t, heads,
                             _attention_mask(heads, batch, length, ctx_len, causal))


# above this many (batched) attention scores per call, attention_t loops over the images
_BATCHED_SCORES_MAX = 1 << 20


@functools.lru_cache(maxsize=64)
def _attention_mask(heads: int, batch: int, length: int, ctx_len: int, causal: bool):
    """Additive (heads, B*L, B*Lk) float32 mask, or None when nothing is masked: query block b
    sees key block b only (and, if causal, keys at or before its position). Built once per shape
    at full size, because a same-shape add is ~10x faster than a broadcasting one on CPU."""
    if batch == 1 and not causal:
        return None
    lowest = np.finfo(np.float32).min
    block = np.triu(np.full((length, ctx_len), lowest, np.float32), k=1) if causal \
        else np.zeros((length, ctx_len), np.float32)
    full = np.full((batch * length, batch * ctx_len), lowest, np.float32)
    for b in range(batch):
        full[b * length:(b + 1) * length, b * ctx_len:(b + 1) * ctx_len] = block
    return Tensor(np.ascontiguousarray(np.broadcast_to(full, (heads,) + full.shape)))


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding, cos half first (sgm `timestep_embedding`, diffusers flip_sin_to_cos).

    The exponent is formed in float32 as the reference forms it; the exp is taken in float64
    and rounded once, because *measured* MindSpore CPU `exp` is ~50 ulps off and a 1-2 ulp error
    in a frequency moves sin/cos by ~1e-4 at arguments near 1024 (image sizes).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = Tensor(np.exp((exponent / np.float32(half)).astype(np.float64)).astype(np.float32))
    args = t.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    emb = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        emb = ops.pad(emb, (0, 1))
    return emb
