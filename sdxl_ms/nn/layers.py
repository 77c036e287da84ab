"""Layers with PyTorch-style parameter names, so checkpoint keys map one to one.

MindSpore's own `nn` layers name norm parameters gamma/beta, default GELU to tanh, pick other
epsilons and pad convolutions 'same' by default (see GUIDE section 3); these small cells make
every such choice explicit. Parameters are created uninitialised-zero: weights always come from
a checkpoint or from `sdxl_ms.weights.random_init`.
"""
from __future__ import annotations

import math
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..backend import conv_impl


def new_parameter(shape, dtype) -> Parameter:
    return Parameter(initializer("zeros", tuple(shape), dtype))


class Linear(nn.Cell):
    """y = x W^T + b, W stored (out, in) as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_parameter((out_features, in_features), dtype)
        self.bias = new_parameter((out_features,), dtype) if bias else None
        self._matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
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
        if self.kernel_size == 1 and self.stride == 1 and self.padding == 0:
            y = _conv1x1(x, self.weight)
        elif conv_impl() == "native":
            y = ops.conv2d(x, self.weight, stride=self.stride, pad_mode="pad",
                           padding=self.padding)
        else:
            y = _conv_im2col(x, self.weight, self.stride, self.padding)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def _conv1x1(x, weight):
    b, c, h, w = x.shape
    out = ops.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, h * w))
    return out.reshape(b, weight.shape[0], h, w)


def _conv_im2col(x, weight, stride: int, padding: int):
    """Convolution as one matmul over the k*k shifted views of the padded input."""
    o, c, kh, kw = weight.shape
    if padding:
        x = ops.pad(x, (padding, padding, padding, padding))
    b, _, h, w = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    views = [x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
             for i in range(kh) for j in range(kw)]
    cols = ops.stack(views, axis=2).reshape(b, c * kh * kw, ho * wo)
    out = ops.matmul(weight.reshape(o, c * kh * kw), cols)
    return out.reshape(b, o, ho, wo)


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
        # ops.group_norm: *measured* 7x faster than composing mean/var on CPU, same rounding
        y = ops.group_norm(x.astype(ms.float32), self.num_groups,
                           self.weight.astype(ms.float32), self.bias.astype(ms.float32), self.eps)
        return y.astype(x.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter((dim,), dtype)
        self.bias = new_parameter((dim,), dtype)

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        mean = x.mean(axis=-1, keep_dims=True)
        var = ops.square(x - mean).mean(axis=-1, keep_dims=True)
        y = (x - mean) * ops.rsqrt(var + self.eps)
        y = y * self.weight.astype(ms.float32) + self.bias.astype(ms.float32)
        return y.astype(dtype)


class Embedding(nn.Cell):
    def __init__(self, num_embeddings: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = new_parameter((num_embeddings, dim), dtype)

    def construct(self, ids):
        return ops.gather(self.weight, ids.astype(ms.int32), 0)


def silu(x):
    return x * ops.sigmoid(x)


class SiLU(nn.Cell):
    """Parameter-free cell, so sgm's Sequential indices (e.g. `out.2`) line up."""

    def construct(self, x):
        return silu(x)


class Identity(nn.Cell):
    def construct(self, x):
        return x


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling of NCHW (exact; *measured* 2x faster on CPU than a
    broadcast repeat)."""
    h, w = x.shape[-2:]
    return ops.interpolate(x, size=(2 * h, 2 * w), mode="nearest")


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


def attention(q, k, v, heads: int, mask: Optional[Tensor] = None):
    """Multi-head scaled dot-product attention on (B, L, heads*d) tensors.

    `mask` is additive, broadcastable to (B, heads, Lq, Lk). Softmax runs in float32.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, lk, heads, d).transpose(0, 2, 3, 1)
    v = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    scores = ops.matmul(q, k).astype(ms.float32) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    out = ops.matmul(probs, v).transpose(0, 2, 1, 3)
    return out.reshape(b, lq, inner)


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
