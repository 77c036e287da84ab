"""How much three float16 attention cores of the outside port round, against torch's, per width.

The outside port's `attention` (tests/outside_port/layers.py) computed three ways on the same
float16 q, k, v: faithful (float32 scores, only exp(s - max) rounded, as torch's CPU kernel
does), `half_scores` (scores from a float16 BatchMatMul before a float32 softmax, a common
MindSpore idiom) and a float16 softmax. Each core's rel L2 from the float64 core is divided by
torch's float16 scaled_dot_product_attention's: the truth ratio an attention-core row would
report. q, k and v are unit normals, so the scaled logits have std 1, as seeded weights give.

    python tools/attention_core_idioms.py --seeds 0,1,2,3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# (heads, head dim, query tokens, key tokens): tiny's UNet, small's 640-wide level (self and
# cross attention at 256x256) and CLIP-L
SHAPES = ((2, 16, 16, 16), (10, 64, 256, 256), (10, 64, 256, 77), (12, 64, 77, 77))


def _float64_core(q, k, v, heads):
    """(B, L, C) in, (B, L, C) out, in float64."""
    b, length, c = q.shape
    split = lambda a: a.astype(np.float64).reshape(b, -1, heads, c // heads).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(c // heads)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, length, c)


def _torch_core(q, k, v, heads):
    import torch
    import torch.nn.functional as F

    b, length, c = q.shape
    split = lambda a: torch.from_numpy(  # noqa: E731
        a.reshape(b, -1, heads, c // heads).transpose(0, 2, 1, 3).copy())
    out = F.scaled_dot_product_attention(split(q), split(k), split(v)).numpy()
    return out.transpose(0, 2, 1, 3).reshape(b, length, c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    args = parser.parse_args()

    import mindspore as ms
    from mindspore import Tensor

    sys.path.insert(0, str(REPO / "tests"))
    from outside_port.layers import attention

    cores = {"faithful": {}, "half_scores": {"half_scores": True},
             "float16 softmax": {"softmax_dtype": ms.float16}}
    print("| heads x dim | tokens (query, key) | " + " | ".join(cores) + " |")
    print("|---|---|" + "---:|" * len(cores))
    for heads, dim, length, ctx in SHAPES:
        ratios = {name: [] for name in cores}
        for seed in (int(s) for s in args.seeds.split(",")):
            rng = np.random.default_rng(seed)
            q, k, v = (rng.standard_normal((1, n, heads * dim)).astype(np.float16)
                       for n in (length, ctx, ctx))
            truth = _float64_core(q, k, v, heads)
            rel = lambda a: np.linalg.norm(a.astype(np.float64) - truth) / np.linalg.norm(truth)  # noqa: E731
            torch_error = rel(_torch_core(q, k, v, heads))
            for name, kwargs in cores.items():
                out = attention(Tensor(q), Tensor(k), Tensor(v), heads, **kwargs).asnumpy()
                ratios[name].append(rel(out) / torch_error)
        cells = " | ".join(f"{min(r):.2f}-{max(r):.2f}" for r in ratios.values())
        print(f"| {heads} x {dim} | {length}, {ctx} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
