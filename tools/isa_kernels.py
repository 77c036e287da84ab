"""MindSpore's CPU MatMul and 3x3 Conv2D at SDXL shapes under each oneDNN ISA cap, beside
PyTorch's: why the port caps oneDNN at AVX2 and what that costs its GEMMs
(docs/time-to-verdict.md). Each (framework, cap) runs in a process of its own, because oneDNN
reads ONEDNN_MAX_CPU_ISA once per process.

    python tools/isa_kernels.py --caps AVX2,AVX512_CORE
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# (rows, inner, out): a 2048-token UNet projection, its GEGLU, a 154-row text MLP
MATMULS = ((2048, 1280, 1280), (2048, 1280, 10240), (154, 1280, 5120))
# (batch, channels, side): UNet levels at 256x256 (CFG batch 2), VAE levels
CONVS = ((2, 320, 32), (2, 640, 16), (1, 512, 64), (1, 256, 128), (1, 128, 256))
SLOW_CONV_S = 1.0  # a conv slower than this is timed once (the reference kernel takes seconds)


def _timed(fn, rounds: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


def _mindspore() -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, ops

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.runtime.launch_blocking()
    ms.device_context.cpu.op_tuning.threads_num(2)
    out, mm = {}, ops.MatMul(transpose_b=True)
    for m, k, n in MATMULS:
        a, b = (Tensor(np.random.randn(*s).astype(np.float32)) for s in ((m, k), (n, k)))
        out[f"matmul {m}x{k}x{n}"] = _timed(lambda: mm(a, b).asnumpy())
    for b, c, side in CONVS:
        x = Tensor(np.random.randn(b, c, side, side).astype(np.float32))
        w = Tensor(np.random.randn(c, c, 3, 3).astype(np.float32) * 0.05)
        native = lambda: ops.conv2d(x, w, None, pad_mode="pad", padding=1).asnumpy()
        t0 = time.perf_counter()
        native()
        first = time.perf_counter() - t0
        out[f"conv b{b} c{c} {side}x{side}"] = first if first > SLOW_CONV_S else _timed(native)
        w2 = w.reshape(c, c * 9)
        mm2 = ops.MatMul()
        out[f"im2col b{b} c{c} {side}x{side}"] = _timed(lambda: ops.stack(
            [mm2(w2, cols) for cols in ops.unfold(x, 3, padding=1)]).asnumpy())
    return out


def _torch() -> dict:
    import torch

    torch.set_num_threads(2)
    out = {}
    with torch.no_grad():
        for m, k, n in MATMULS:
            a, b = torch.randn(m, k), torch.randn(n, k)
            out[f"matmul {m}x{k}x{n}"] = _timed(lambda: torch.nn.functional.linear(a, b))
        for b, c, side in CONVS:
            x, w = torch.randn(b, c, side, side), torch.randn(c, c, 3, 3) * 0.05
            out[f"conv b{b} c{c} {side}x{side}"] = _timed(
                lambda: torch.nn.functional.conv2d(x, w, padding=1))
    return out


def _gflop(name: str) -> float:
    if name.startswith("matmul"):
        m, k, n = (int(v) for v in name.split()[1].split("x"))
        return 2 * m * k * n / 1e9
    b, c, side = name.split()[1:]
    side = int(side.split("x")[0])
    return 2 * int(b[1:]) * int(c[1:]) ** 2 * 9 * side * side / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="AVX2,AVX512_CORE")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_torch() if args.child == "torch" else _mindspore()))
        return
    runs = {}
    for who in ["torch"] + [f"mindspore {cap}" for cap in args.caps.split(",")]:
        env = dict(os.environ)
        if who != "torch":
            env["ONEDNN_MAX_CPU_ISA"] = who.split()[1]
        proc = subprocess.run([sys.executable, __file__, "--child", who.split()[0]], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{who}: {proc.stderr.strip().splitlines()[-1]}")
        runs[who] = json.loads(proc.stdout.strip().splitlines()[-1])
    names = list(runs[f"mindspore {args.caps.split(',')[0]}"])
    print("| op | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for name in names:
        cells = [f"{runs[w][name] * 1e3:.1f} ms ({_gflop(name) / runs[w][name]:.0f} GF/s)"
                 if name in runs[w] else "-" for w in runs]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
