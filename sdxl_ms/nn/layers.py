"""Layers with PyTorch-style parameter names, so checkpoint keys map one to one.

MindSpore's own `nn` layers name norm parameters gamma/beta, default GELU to tanh, pick other
epsilons and pad convolutions 'same' by default (docs/porting-notes.md, section 4); these small cells make
every such choice explicit. Parameters are created uninitialised-zero and float32: weights
always come from a checkpoint or from `sdxl_ms.weights.random_init`, and precision is set after
the build (`sdxl_ms.nn.precision.cast`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops
from mindspore.common.initializer import initializer

from .module import Module


def new_parameter(shape) -> Parameter:
    return Parameter(initializer("zeros", tuple(shape), ms.float32))


# GEMMs with the transposes folded into the kernel's operand packing: on MindSpore 2.10's CPU
# backend a transposed or sliced *view* is made contiguous by a copy that runs at ~25 ns per
# element (*measured*: as slow as the GEMM it feeds), so layouts are chosen such that every
# transpose lands in a MatMul flag and every slice is a contiguous block of leading-axis rows.
_MM_NT = ops.MatMul(transpose_b=True)  # a @ b.T
_MM_TT = ops.MatMul(transpose_a=True, transpose_b=True)  # a.T @ b.T
_BMM_TN = ops.BatchMatMul(transpose_a=True)
_BMM_NT = ops.BatchMatMul(transpose_b=True)


def add_channel_bias_per_image(x, bias):
    """x (B, C, H, W) plus bias (B, C) over H and W (sgm: `h + emb_out[..., None, None]`), as
    one BiasAdd over the (1, B*C, H, W) view: *measured* a broadcasting `+` is ~10-40x slower
    on CPU."""
    b, c, h, w = x.shape
    return ops.bias_add(x.reshape(1, b * c, h, w), bias.reshape(-1)).reshape(b, c, h, w)


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


class Linear(Module):
    """y = x W^T + b, W stored (out, in) as in PyTorch. Besides the plain forward it offers the
    transposed layouts the attention and feed-forward blocks chain without copies."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_parameter((out_features, in_features))
        self.bias = new_parameter((out_features,)) if bias else None

    def forward(self, p, x):
        lead = x.shape[:-1]
        y = linear(x.reshape(-1, self.in_features), p["weight"], self.optional(p, "bias"))
        return y.reshape(lead + (self.out_features,))

    # The layouts below are entry points beside the plain call: like `__call__`, each takes the
    # parent's weights and looks its own up.

    def transposed_out(self, p, x2d):
        """Row-major tokens (N, in) -> the transposed output (out, N)."""
        if self.observing:  # a class constant: graph mode folds it away
            self.notify_input(p, x2d)
        own = p[self.key]
        y_t = linear_t(x2d, own["weight"], self.optional(own, "bias"))
        if self.observing:  # hooks see (N, out), as from the plain call, and may replace it
            y_t = self.notify_output(p, (x2d,), y_t.transpose()).transpose()
        return y_t

    def from_transposed(self, p, y_t):
        """Transposed activations (in, N) -> row-major tokens (N, out)."""
        if self.observing:
            self.notify_input(p, y_t.transpose())
        p = p[self.key]
        return linear_from_t(y_t, p["weight"], self.optional(p, "bias"))

    def from_channels_first(self, p, x):
        """An NCHW map (B, in, H, W) -> row-major tokens (B*H*W, out). Each image's (in, HW)
        block is the transposed layout, so the transpose is a MatMul flag, image by image."""
        if self.observing:
            self.notify_input(p, x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
                              .reshape(-1, x.shape[1]))
        p = p[self.key]
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        tokens = ops.cat([linear_from_t(flat[i], p["weight"]) for i in range(b)], axis=0)
        return tokens if self.bias is None else ops.bias_add(tokens, p["bias"])

    def to_channels_first(self, p, tokens, shape):
        """Row-major tokens (B*H*W, in) -> an NCHW map of `shape` (B, out, H, W), the
        transpose again a MatMul flag."""
        if self.observing:
            self.notify_input(p, tokens)
        p = p[self.key]
        b, length = shape[0], shape[2] * shape[3]
        y = ops.stack([linear_t(tokens[i * length:(i + 1) * length], p["weight"])
                       for i in range(b)])
        y = y if self.bias is None else ops.bias_add(y, p["bias"])
        return y.reshape(shape)


class Conv2d(Module):
    """NCHW convolution with symmetric zero padding, PyTorch weight layout (O, I, kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = new_parameter((out_channels, in_channels, kernel_size, kernel_size))
        self.bias = new_parameter((out_channels,)) if bias else None

    def forward(self, p, x):
        return conv2d(x, p["weight"], self.optional(p, "bias"), self.stride, self.padding)


def conv2d(x, weight, bias=None, stride: int = 1, padding: int = 0):
    """NCHW convolution, PyTorch weight layout (O, I, kh, kw), symmetric zero padding."""
    return ops.conv2d(x, weight, bias, stride=stride, pad_mode="pad", padding=padding)


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


class GroupNorm(Module):
    """GroupNorm computed in float32 whatever the parameter dtype."""

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = new_parameter((num_channels,))
        self.bias = new_parameter((num_channels,))

    def forward(self, p, x):
        return group_norm(x, self.num_groups, p["weight"], p["bias"], self.eps)


class LayerNorm(Module):
    """LayerNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter((dim,))
        self.bias = new_parameter((dim,))

    def forward(self, p, x):
        return layer_norm(x, p["weight"], p["bias"], self.eps)


class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = new_parameter((num_embeddings, dim))

    def forward(self, p, ids):
        return ops.gather(p["weight"], ids.astype(ms.int32), 0)


def silu(x):
    """x * sigmoid(x) as one kernel (*measured* ~1.5x faster than the two-op form on CPU)."""
    return ops.silu(x)


class SiLU(Module):
    """Parameter-free module, so sgm's Sequential indices (e.g. `out.2`) line up."""

    def forward(self, p, x):
        return silu(x)


class SinusoidalTimesteps(Module):
    """`timestep_embedding` as a parameter-free module (diffusers' `time_proj`; sgm calls the
    function inline), so a harness can observe and replay the sinusoid on its own: an error in
    it (computed in float16, say) is invisible to the Linear after it, which is compared on the
    reference's embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, p, t):
        return timestep_embedding(t, self.dim)


class Identity(Module):
    """Parameter-free pass-through (sgm's dropout slots, an unchanged-width skip)."""

    def forward(self, p, x):
        return x


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling of NCHW, exact. *Measured* on CPU: two repeat_interleave
    copies are 1.5-4x faster than the nearest `interpolate` kernel."""
    return ops.repeat_interleave(ops.repeat_interleave(x, 2, 3), 2, 2)


class Upsample(Module):
    """Nearest 2x then a 3x3 conv named `conv`: the same block in sgm's UNet and VAE."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, p, x):
        return self.conv(p, upsample_nearest2x(x))


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
    `mask` is additive, (heads, L, Lk) (or broadcastable to it).

    In float16/bfloat16 it rounds where torch's CPU scaled_dot_product_attention rounds and
    nowhere else: scores, softmax and both products accumulate in float32; only the
    unnormalised weights exp(s - max) take the activation dtype before the product with V, and
    the output is divided by their float32 sum and rounded once. Rounding the scores or the
    normalised probabilities instead (what a float16 BatchMatMul and softmax do) is 1.8x (logit
    std 1) to 7x (std 8) torch's error on the same q, k, v (docs/precision-at-real-widths.md).
    """
    inner, length = q_t.shape
    d = inner // heads
    out_dtype = v_t.dtype
    reduced = out_dtype != ms.float32
    if reduced:
        q_t, k_t = q_t.astype(ms.float32), k_t.astype(ms.float32)
    scale = 1.0 / math.sqrt(d)
    on_q = _exact_scale(scale)  # scaling q instead of the scores: same bits, L-fold fewer products
    if on_q:
        q_t = q_t * scale
    scores = _BMM_TN(q_t.reshape(heads, d, length), k_t.reshape(heads, d, k_t.shape[1]))
    if not on_q:
        scores = scores * scale
    if mask is not None:
        scores = scores + mask
    if not reduced:
        probs = ops.softmax(scores, axis=-1)
        return _BMM_NT(v_t.reshape(heads, d, v_t.shape[1]), probs).reshape(inner, length)
    weights = ops.exp(scores - scores.max(axis=-1, keepdims=True))
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights.astype(out_dtype).astype(ms.float32)
    out = _BMM_NT(v_t.astype(ms.float32).reshape(heads, d, v_t.shape[1]), weights)
    return (out / total.reshape(heads, 1, length)).reshape(inner, length).astype(out_dtype)


def _exact_scale(scale: float) -> bool:
    """Whether multiplying by `scale` is exact (a power of two, as 1/sqrt(64) is), so applying it
    to q before q^T k gives the very bits of applying it to the scores after: every rounding of
    the product's sum scales with it. The scores are (L, Lk) per head against q's (d, L); at
    1024x1024 the UNet's 4096-token self-attentions spent about 10% of their core on the
    scores' multiply (measured)."""
    return math.frexp(scale)[0] == 0.5


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
        per_image = _per_image(batch, heads, length, ctx_len)
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


def attend_projections_t(q_t, k_t, v_t, batch: int, heads: int, causal: bool = False):
    """`attention_t` on projections already made for all images, q_t (inner, B*L), k_t and
    v_t (inner, B*Lk): for a module whose q, k and v come from its children's calls (a harness
    watching them may replace them). Per image it takes each image's column block: a copy, but
    the same bits as projecting the image alone (*measured*: a GEMM's columns do not depend on
    how many there are, at SDXL's widths in float32 and float16)."""
    length, ctx_len = q_t.shape[1] // batch, k_t.shape[1] // batch
    if not _per_image(batch, heads, length, ctx_len):
        return attend_t(q_t, k_t, v_t, batch, heads, causal)
    return ops.cat([attend_t(q_t[:, i * length:(i + 1) * length],
                             k_t[:, i * ctx_len:(i + 1) * ctx_len],
                             v_t[:, i * ctx_len:(i + 1) * ctx_len], 1, heads, causal)
                    for i in range(batch)], axis=1)


def _per_image(batch: int, heads: int, length: int, ctx_len: int) -> bool:
    """Whether attention goes image by image (`attention_t`'s default)."""
    return batch > 1 and heads * length * ctx_len * batch * batch > _BATCHED_SCORES_MAX


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
