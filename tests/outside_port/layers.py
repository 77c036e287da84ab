"""Building blocks on stock `mindspore.nn` Cells, with the precision choices made explicit.

Stock cells are used as they come (`nn.Dense`, `nn.Conv2d`, `nn.GroupNorm`, `nn.LayerNorm`,
`nn.Embedding`), so parameter names carry MindSpore's spellings (`gamma`, `beta`,
`embedding_table`). The two norm subclasses only change *where* they compute: in float32
whatever the model dtype, as torch's CPU norms accumulate in float32 for half inputs.

`Defects` switches on the deliberate one-module bugs the port's defect factories carry; the
faithful port has them all off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

F32, F16 = ms.float32, ms.float16


@dataclass(frozen=True)
class Defects:
    """One field per defect variant (each changes exactly one module's computation)."""

    exp32_timestep: bool = False  # UNet time embedding: frequencies from MindSpore float32 exp
    fp16_vae_attention: bool = False  # decoder.mid.attn_1 computed in float16
    ln_eps_1e6: bool = False  # input_blocks.4.1.transformer_blocks.0.norm1 with eps 1e-6
    tanh_geglu: bool = False  # GEGLU's gate through tanh-approximate GELU
    fp16_clip_softmax: bool = False  # CLIP-L layer 0's attention softmax in float16
    half_scores: bool = False  # the UNet's attention scores from a float16 BatchMatMul


FAITHFUL = Defects()


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in float32 (input and affine), returned in the input's dtype."""

    def construct(self, x):
        y = ops.group_norm(x.astype(F32), self.num_groups, self.gamma.astype(F32),
                           self.beta.astype(F32), self.eps)
        return y.astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis computed in float32, returned in the input's dtype.
    MindSpore's default epsilon is 1e-7; every caller passes torch's 1e-5 explicitly."""

    def __init__(self, dim: int, eps: float):
        super().__init__((dim,), begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.eps = eps

    def construct(self, x):
        y, _, _ = self.layer_norm(x.astype(F32), self.gamma.astype(F32), self.beta.astype(F32))
        return y.astype(x.dtype)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """torch's Conv2d defaults: explicit symmetric zero padding and a bias (MindSpore's
    defaults are pad_mode='same' and no bias)."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, pad_mode="pad", padding=padding,
                     has_bias=True)


def dense(cin: int, cout: int, bias: bool = True) -> nn.Dense:
    return nn.Dense(cin, cout, has_bias=bias)


def gelu_erf(x):
    """Exact GELU (torch's default), in float32; nn.GELU would default to the tanh form."""
    x32 = x.astype(F32)
    return (0.5 * x32 * (1.0 + ops.erf(x32 * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


def gelu_tanh(x):
    """The tanh approximation of GELU (a defect where the reference uses erf)."""
    x32 = x.astype(F32)
    inner = math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)
    return (0.5 * x32 * (1.0 + ops.tanh(inner))).astype(x.dtype)


def quick_gelu(x):
    """CLIP's QuickGELU x * sigmoid(1.702 x), in float32."""
    x32 = x.astype(F32)
    return (x32 * ops.sigmoid(1.702 * x32)).astype(x.dtype)


ACTIVATIONS = {"gelu": gelu_erf, "quick_gelu": quick_gelu}


def silu(x):
    return ops.silu(x)


class Identity(nn.Cell):
    """A parameter-free slot (sgm's dropout and SiLU positions keep Sequential indices)."""

    def construct(self, x):
        return x


class SiLU(nn.Cell):
    def construct(self, x):
        return ops.silu(x)


def causal_mask(length: int) -> Tensor:
    """Additive float32 (L, L) mask: position i sees keys <= i."""
    lowest = np.finfo(np.float32).min
    return Tensor(np.triu(np.full((length, length), lowest, np.float32), k=1))


def attention(q, k, v, heads: int, mask=None, softmax_dtype=F32, half_scores=False):
    """Scaled dot-product attention. q (B, L, C), k and v (B, Lk, C) -> (B, L, C).

    For half inputs it rounds as torch's CPU attention does: scores from a float32 BatchMatMul
    (`half_scores`, a defect, takes the compute dtype's, as a plain MindSpore port often
    does), a float32 softmax whose unnormalised weights exp(s - max) alone are rounded to v's
    dtype, their product with v in float32, divided by the float32 sum and rounded once.
    Rounding the normalised probabilities instead costs up to 1.4x torch's core error at the
    tiny preset's widths (measured: the harness's attention-core rows). `softmax_dtype`
    float16, a defect, softmaxes rounded scores in float16 and rounds the probabilities.
    """
    b, length, c = q.shape
    ctx_len = k.shape[1]
    d = c // heads
    qh = q.reshape(b, length, heads, d).transpose(0, 2, 1, 3)
    kh = k.reshape(b, ctx_len, heads, d).transpose(0, 2, 1, 3)
    vh = v.reshape(b, ctx_len, heads, d).transpose(0, 2, 1, 3)
    if not half_scores:
        qh, kh = qh.astype(F32), kh.astype(F32)
    scores = ops.matmul(qh, kh.transpose(0, 1, 3, 2)).astype(F32) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    if v.dtype == F32 or softmax_dtype != F32:
        out = ops.matmul(ops.softmax(scores.astype(softmax_dtype), axis=-1).astype(v.dtype), vh)
    else:
        weights = ops.exp(scores - scores.max(axis=-1, keepdims=True))
        total = weights.sum(axis=-1, keepdims=True)
        out = ops.matmul(weights.astype(v.dtype).astype(F32), vh.astype(F32))
        out = (out / total).astype(v.dtype)
    return out.transpose(0, 2, 1, 3).reshape(b, length, c)


def sinusoid_frequencies(dim: int, max_period: float = 10000.0, exp32: bool = False) -> Tensor:
    """exp(-ln(max_period) * i / half), i < half, as float32 (B-independent).

    diffusers forms the exponent in float32 and takes torch's float32 exp, accurate to about
    an ulp. MindSpore's CPU float32 `exp` is up to ~50 ulps off (measured here: 49 at
    dim 32), and at arguments t * f near 1000 a 3e-6 relative error in f moves sin and cos by
    ~2e-3. So the exponent is formed in float32 as the reference forms it and the exp is taken
    in float64 and rounded once. `exp32=True` is the defect: MindSpore's float32 `ops.exp`.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = (exponent / np.float32(half)).astype(np.float32)
    if exp32:
        return ops.exp(Tensor(exponent))
    return Tensor(np.exp(exponent.astype(np.float64)).astype(np.float32))


def timestep_embedding(t, dim: int, freqs: Tensor):
    """(N,) timesteps -> (N, dim) float32 [cos | sin] (sgm's order, diffusers'
    flip_sin_to_cos=True); t * f in float32 as the reference multiplies."""
    args = t.astype(F32).reshape(-1, 1) * freqs.reshape(1, -1)
    emb = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        emb = ops.pad(emb, (0, 1))
    return emb


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling (NCHW), exact."""
    return ops.repeat_interleave(ops.repeat_interleave(x, 2, 3), 2, 2)


class Upsample(nn.Cell):
    """sgm's Upsample in both the UNet and the VAE: nearest 2x, then `conv` (3x3, pad 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(upsample_nearest2x(x))
