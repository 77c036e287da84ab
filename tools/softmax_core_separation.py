"""How far an attention core with its softmax in float16 is from the faithful one, on its own.

The core (scores, softmax, the product with V) is fed the same float16 q, k, v on every side,
so nothing upstream rounds differently: this is the best separation any teacher-forced
attention-core check could see. Printed per logit scale (the std of the scaled scores; seeded
1/sqrt(fan_in) weights give about 1, trained attention is peakier): each core's rel L2 from
the float64 core on the same inputs, and its truth ratio against torch's float16
scaled_dot_product_attention on CPU (the reference's own core).

    python tools/softmax_core_separation.py --scales 1,2,4,8 --seeds 0,1,2,3
"""
from __future__ import annotations

import argparse

import numpy as np


def _float64_core(q, k, v, heads):
    """(heads*d, L) transposed layout, as the port's attention_heads_t takes it."""
    d = q.shape[0] // heads
    q, k, v = (a.astype(np.float64).reshape(heads, d, -1) for a in (q, k, v))
    s = np.einsum("hdi,hdj->hij", q, k) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hdj,hij->hdi", v, p).reshape(heads * d, -1)


def _torch_core(q, k, v, heads):
    import torch
    import torch.nn.functional as F

    d = q.shape[0] // heads
    as_bhld = lambda a: torch.from_numpy(a.reshape(heads, d, -1).transpose(0, 2, 1).copy())[None]
    out = F.scaled_dot_product_attention(as_bhld(q), as_bhld(k), as_bhld(v))[0]
    return out.numpy().transpose(0, 2, 1).reshape(heads * d, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,2,4,8")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=77)
    args = parser.parse_args()

    from mindspore import Tensor

    from precision_bugs import load_fp16_bugs  # a sibling in tools/

    from sdxl_ms.nn.layers import attention_heads_t

    bug = load_fp16_bugs().attention_softmax_in_float16
    heads, d, n = args.heads, 64, args.tokens
    rel = lambda a, t: float(np.linalg.norm(a.astype(np.float64) - t) / np.linalg.norm(t))
    print("| logit std | torch core | faithful core | bug core | faithful / torch "
          "| bug / torch | bug / faithful (smallest) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for scale in (float(s) for s in args.scales.split(",")):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            g = np.random.default_rng(seed)
            q = (g.standard_normal((heads * d, n)) * scale).astype(np.float16)
            k, v = (g.standard_normal((heads * d, n)).astype(np.float16) for _ in range(2))
            truth = _float64_core(q, k, v, heads)
            ms_args = [Tensor(a) for a in (q, k, v)]
            rows.append((rel(_torch_core(q, k, v, heads), truth),
                         rel(attention_heads_t(*ms_args, heads).asnumpy(), truth),
                         rel(bug(*ms_args, heads).asnumpy(), truth)))
        r = np.array(rows)
        print(f"| {scale:g} | {r[:, 0].max():.2e} | {r[:, 1].max():.2e} | {r[:, 2].max():.2e} "
              f"| {np.max(r[:, 1] / r[:, 0]):.2f} | {np.min(r[:, 2] / r[:, 0]):.2f} "
              f"| {np.min(r[:, 2] / r[:, 1]):.2f} |")


if __name__ == "__main__":
    main()
