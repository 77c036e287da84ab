"""Per-layer and per-component CPU profile of the port against PyTorch/diffusers on the same cores.

    python -m benchmarks.profile_port blocks [--part unet|vae|text] [--jit off,blocks] [--rounds 3]
    python -m benchmarks.profile_port convs [--rounds 3]
    python -m benchmarks.profile_port tiny [--jit off,blocks,model] [--rounds 3]
    python -m benchmarks.profile_port whole --component unet|vae|text --side port|torch [--jit MODE]
    python -m benchmarks.profile_port trace --component unet|vae|text --side port|torch

`blocks` times every distinct layer of the sdxl-base UNet (256x256, CFG batch 2), VAE decoder
(256x256) and the two text encoders, each port block against the matching diffusers/transformers
block loaded with the same weights, port and torch calls interleaved so a noisy machine shifts both;
it also checks each block's outputs agree (relative L2), and multiplies by how often each block
occurs to estimate the whole component. `convs` compares the two convolution paths of
`backend.conv_impl()` with torch at every SDXL shape. `whole` times one full-size component in
this process alone (run port and torch as separate processes: a full UNet is ~10 GB per
framework), compile (first call) apart, and prints its peak RSS. `trace` splits one call of a
whole component by op, on either side. `tiny` times the tiny preset's components and 4-step
pipeline, both sides in one process. Numbers are medians of `--rounds` calls after a warm-up;
port jit modes are `sdxl_ms.backend.set_jit`'s.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from .measure import timed_call, peak_rss_bytes

SEED = 0


def paired_times(port_fn, torch_fn, rounds: int) -> Tuple[float, float]:
    """Medians of interleaved calls (one warm-up each), so load spikes hit both sides."""
    port_fn()
    torch_fn()
    tp, tt = [], []
    for _ in range(rounds):
        tp.append(timed_call(port_fn))
        tt.append(timed_call(torch_fn))
    return float(np.median(tp)), float(np.median(tt))


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def peak_rss_gb() -> float:
    return peak_rss_bytes() / 2 ** 30


# ---- port / torch setup -----------------------------------------------------------------------

def _ms():
    import mindspore as ms

    from sdxl_ms.backend import init_runtime

    init_runtime()
    return ms


def set_jit(mode) -> None:
    """`sdxl_ms.backend.set_jit`, or nothing on a port without jit modes (an older checkout
    profiled as the baseline)."""
    try:
        from sdxl_ms.backend import set_jit as port_set_jit
    except ImportError:
        if mode not in ("off", False, None):
            raise SystemExit(f"this port has no jit mode {mode!r}") from None
        return
    port_set_jit(mode)


def _torch():
    import torch

    torch.set_grad_enabled(False)
    return torch


def load_torch_from_port(module, port_cell, rules):
    """Copy the port cell's weights into `module` through key rules written with the prefixes
    `P.` (port side) and `R.` (torch side) (strict)."""
    import torch

    from sdxl_ms.weights.keymap import convert_to_diffusers
    from sdxl_ms.weights.state import named_parameters

    params = named_parameters(port_cell, "P.")
    sd = {k[2:]: v for k, v in convert_to_diffusers(rules, lambda n: params[n].asnumpy())}
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                           strict=True)
    return module.eval()


# ---- sdxl-base blocks -------------------------------------------------------------------------

class Case:
    def __init__(self, group: str, name: str, count: int, build: Callable):
        self.group, self.name, self.count, self.build = group, name, count, build


def unet_cases(batch: int, latent: int) -> List[Case]:
    """Every distinct UNet layer at sdxl-base widths, with how many times one step runs it."""
    from sdxl_ms.config import SDXL_BASE

    cfg = SDXL_BASE.unet
    s0, s1, s2 = latent, latent // 2, latent // 4
    res = [((320, 320, s0), 2), ((320, 640, s1), 1), ((640, 640, s1), 1), ((640, 1280, s2), 1),
           ((1280, 1280, s2), 3), ((2560, 1280, s2), 2), ((1920, 1280, s2), 1),
           ((1920, 640, s1), 1), ((1280, 640, s1), 1), ((960, 640, s1), 1),
           ((960, 320, s0), 1), ((640, 320, s0), 2)]
    cases = [Case("unet", f"ResBlock {ci}->{co} @{s}", n,
                  lambda ci=ci, co=co, s=s: _unet_resblock(batch, ci, co, s))
             for (ci, co, s), n in res]
    # a depth-d SpatialTransformer = one depth-1 SpatialTransformer + (d - 1) more blocks
    shells = {640: 5, 1280: 6}
    blocks = {640: 5 * cfg.transformer_depth[1],
              1280: 5 * cfg.transformer_depth[2] + cfg.transformer_depth_middle}
    for ch, s in ((640, s1), (1280, s2)):
        cases.append(Case("unet", f"SpatialTransformer depth 1, {ch} @{s}", shells[ch],
                          lambda ch=ch, s=s: _unet_transformer(batch, ch, s, block_only=False)))
        cases.append(Case("unet", f"TransformerBlock {ch} @{s}", blocks[ch] - shells[ch],
                          lambda ch=ch, s=s: _unet_transformer(batch, ch, s, block_only=True)))
    cases += [Case("unet", f"Downsample {c} @{s}", 1, lambda c=c, s=s: _unet_resample(batch, c, s, "down"))
              for c, s in ((320, s0), (640, s1))]
    cases += [Case("unet", f"Upsample {c} @{s}", 1, lambda c=c, s=s: _unet_resample(batch, c, s, "up"))
              for c, s in ((1280, s2), (640, s1))]
    return cases


def _rng():
    return np.random.default_rng(SEED)


def _unet_resblock(batch, ci, co, s):
    ms = _ms()
    torch = _torch()
    from diffusers.models.resnet import ResnetBlock2D

    from sdxl_ms.models.unet import ResBlock
    from sdxl_ms.weights.keymap_unet import _resblock
    from sdxl_ms.weights.state import randomize

    port = ResBlock(ci, 1280, co, 32, ms.float32)
    randomize(port, SEED, "blk.")
    ref = load_torch_from_port(ResnetBlock2D(in_channels=ci, out_channels=co, temb_channels=1280,
                                             groups=32, eps=1e-5), port,
                               _resblock("P", "R", ci != co))
    rng = _rng()
    x = rng.standard_normal((batch, ci, s, s)).astype(np.float32)
    emb = rng.standard_normal((batch, 1280)).astype(np.float32)
    return port, (ms.Tensor(x), ms.Tensor(emb)), \
        lambda: ref(torch.from_numpy(x), torch.from_numpy(emb)).numpy(), None


def _strip(inner: str, rules):
    """Drop `inner` after the P./R. prefixes (rules for a sub-module of a bigger block)."""
    from sdxl_ms.weights.keymap import KeyRule

    def cut(n):
        return n[:2] + n[2 + len(inner):] if n[2:].startswith(inner) else n
    return [KeyRule(tuple(cut(n) for n in r.sgm), tuple(cut(n) for n in r.diffusers), r.kind)
            for r in rules]


def _unet_transformer(batch, ch, s, block_only: bool):
    ms = _ms()
    torch = _torch()
    from diffusers.models.attention import BasicTransformerBlock as TorchBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from sdxl_ms.models.unet import BasicTransformerBlock, SpatialTransformer
    from sdxl_ms.weights.keymap_unet import _transformer
    from sdxl_ms.weights.state import randomize

    heads = ch // 64
    rng = _rng()
    ctx = rng.standard_normal((batch, 77, 2048)).astype(np.float32)
    rules = _transformer("P", "R", 1)
    if block_only:
        port = BasicTransformerBlock(ch, heads, 64, 2048, ms.float32)
        randomize(port, SEED, "st.transformer_blocks.0.")
        ref = TorchBlock(ch, heads, 64, cross_attention_dim=2048, activation_fn="geglu",
                         attention_bias=False, upcast_attention=False, norm_type="layer_norm",
                         norm_elementwise_affine=True, norm_eps=1e-5, only_cross_attention=False,
                         double_self_attention=False)
        inner = "transformer_blocks.0."
        block_rules = [r for r in rules if r.sgm[0].startswith("P." + inner)]
        load_torch_from_port(ref, port, _strip(inner, block_rules))
        x = rng.standard_normal((batch, s * s, ch)).astype(np.float32)
        return port, (ms.Tensor(x), ms.Tensor(ctx)), \
            lambda: ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy(), None
    port = SpatialTransformer(ch, heads, 64, 1, 2048, 32, ms.float32)
    randomize(port, SEED, "st.")
    ref = Transformer2DModel(num_attention_heads=heads, attention_head_dim=64, in_channels=ch,
                             num_layers=1, cross_attention_dim=2048, norm_num_groups=32,
                             use_linear_projection=True, upcast_attention=False)
    load_torch_from_port(ref, port, rules)
    x = rng.standard_normal((batch, ch, s, s)).astype(np.float32)
    return port, (ms.Tensor(x), ms.Tensor(ctx)), \
        lambda: ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy(), \
        "shell"


def _unet_resample(batch, c, s, kind):
    ms = _ms()
    torch = _torch()
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    from sdxl_ms.models.unet import Downsample
    from sdxl_ms.nn.layers import Upsample
    from sdxl_ms.weights.keymap import rule
    from sdxl_ms.weights.state import randomize

    if kind == "down":
        port, ref = Downsample(c, ms.float32), Downsample2D(c, use_conv=True, padding=1)
        leaf, dleaf = "op", "conv"
    else:
        port, ref = Upsample(c, ms.float32), Upsample2D(c, use_conv=True)
        leaf, dleaf = "conv", "conv"
    randomize(port, SEED, "r.")
    rules = [rule(f"P.{leaf}.{w}", f"R.{dleaf}.{w}") for w in ("weight", "bias")]
    if kind == "down":  # diffusers registers the same conv twice (`conv` and `Conv2d_0`)
        rules += [rule(f"P.{leaf}.{w}", f"R.Conv2d_0.{w}") for w in ("weight", "bias")]
    load_torch_from_port(ref, port, rules)
    x = _rng().standard_normal((batch, c, s, s)).astype(np.float32)
    return port, (ms.Tensor(x),), lambda: ref(torch.from_numpy(x)).numpy(), None


def vae_cases(latent: int) -> List[Case]:
    """Every distinct decoder layer at sdxl-base widths for one image (batch 1)."""
    s = [latent * 2 ** i for i in range(4)]  # 32, 64, 128, 256 for a 256x256 image
    res = [((512, 512, s[0]), 2 + 3), ((512, 512, s[1]), 3), ((512, 256, s[2]), 1),
           ((256, 256, s[2]), 2), ((256, 128, s[3]), 1), ((128, 128, s[3]), 2)]
    cases = [Case("vae", f"ResnetBlock {ci}->{co} @{h}", n,
                  lambda ci=ci, co=co, h=h: _vae_resnet(ci, co, h)) for (ci, co, h), n in res]
    cases.append(Case("vae", f"AttnBlock 512 @{s[0]}", 1, lambda: _vae_attn(512, s[0])))
    cases += [Case("vae", f"Upsample {c} @{h}->{2 * h}", 1,
                   lambda c=c, h=h: _unet_resample(1, c, h, "up")) for c, h in
              ((512, s[0]), (512, s[1]), (256, s[2]))]
    cases.append(Case("vae", f"conv_in 4->512 @{s[0]}", 1, lambda: _conv(4, 512, s[0], 1)))
    cases.append(Case("vae", f"norm_out+conv_out 128->3 @{s[3]}", 1, lambda: _vae_out(s[3])))
    return cases


def _vae_resnet(ci, co, h):
    ms = _ms()
    torch = _torch()
    from diffusers.models.resnet import ResnetBlock2D

    from sdxl_ms.config import SDXL_BASE
    from sdxl_ms.models.autoencoder import ResnetBlock
    from sdxl_ms.weights.keymap_vae import _resnet
    from sdxl_ms.weights.state import randomize

    port = ResnetBlock(SDXL_BASE.vae, ci, co, ms.float32)
    randomize(port, SEED, "blk.")
    ref = load_torch_from_port(ResnetBlock2D(in_channels=ci, out_channels=co, temb_channels=None,
                                             groups=32, eps=1e-6), port,
                               _resnet("P", "R", ci != co))
    x = _rng().standard_normal((1, ci, h, h)).astype(np.float32)
    return port, (ms.Tensor(x),), lambda: ref(torch.from_numpy(x), None).numpy(), None


def _vae_attn(c, h):
    ms = _ms()
    torch = _torch()
    from diffusers.models.attention_processor import Attention

    from sdxl_ms.config import SDXL_BASE
    from sdxl_ms.models.autoencoder import AttnBlock
    from sdxl_ms.weights.keymap_vae import _attention
    from sdxl_ms.weights.state import randomize

    port = AttnBlock(SDXL_BASE.vae, c, ms.float32)
    randomize(port, SEED, "a.")
    ref = Attention(c, heads=1, dim_head=c, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                    spatial_norm_dim=None, residual_connection=True, bias=True, upcast_softmax=True,
                    _from_deprecated_attn_block=True)
    load_torch_from_port(ref, port, _attention("P", "R"))
    x = _rng().standard_normal((1, c, h, h)).astype(np.float32)
    return port, (ms.Tensor(x),), lambda: ref(torch.from_numpy(x)).numpy(), None


def _conv(ci, co, h, batch, k=3):
    ms = _ms()
    torch = _torch()
    from sdxl_ms.nn.layers import Conv2d
    from sdxl_ms.weights.state import randomize

    port = Conv2d(ci, co, k, padding=k // 2)
    randomize(port, SEED, "c.")
    ref = torch.nn.Conv2d(ci, co, k, padding=k // 2)
    ref.load_state_dict({n: torch.from_numpy(p.asnumpy()) for n, p in port.parameters_and_names()})
    x = _rng().standard_normal((batch, ci, h, h)).astype(np.float32)
    return port, (ms.Tensor(x),), lambda: ref(torch.from_numpy(x)).numpy(), None


def _vae_out(h):
    ms = _ms()
    torch = _torch()
    from mindspore import nn

    from sdxl_ms.nn.layers import Conv2d, GroupNorm, silu
    from sdxl_ms.weights.state import randomize

    class Out(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm_out = GroupNorm(32, 128, 1e-6)
            self.conv_out = Conv2d(128, 3, 3, padding=1)

        def construct(self, x):
            return self.conv_out(silu(self.norm_out(x)))

    port = Out()
    randomize(port, SEED, "o.")
    tn = torch.nn.GroupNorm(32, 128, eps=1e-6)
    tc = torch.nn.Conv2d(128, 3, 3, padding=1)
    p = {n: torch.from_numpy(v.asnumpy()) for n, v in port.parameters_and_names()}
    tn.load_state_dict({"weight": p["norm_out.weight"], "bias": p["norm_out.bias"]})
    tc.load_state_dict({"weight": p["conv_out.weight"], "bias": p["conv_out.bias"]})
    x = _rng().standard_normal((1, 128, h, h)).astype(np.float32)
    return port, (ms.Tensor(x),), \
        lambda: tc(torch.nn.functional.silu(tn(torch.from_numpy(x)))).numpy(), None


def text_cases(batch: int) -> List[Case]:
    return [Case("text", f"CLIP-L (12 layers) batch {batch}", 1, lambda: _text("l", batch)),
            Case("text", f"OpenCLIP-bigG (32 layers) batch {batch}", 1, lambda: _text("g", batch))]


def _text(which, batch):
    ms = _ms()
    torch = _torch()
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection

    from sdxl_ms.config import SDXL_BASE
    from sdxl_ms.models.conditioner import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2
    from sdxl_ms.weights.diffusers_configs import text_encoder_config
    from sdxl_ms.weights.keymap_text import clip_g_rules, clip_l_rules
    from sdxl_ms.weights.state import randomize

    cc = SDXL_BASE.conditioner
    ids = np.random.default_rng(SEED).integers(1, 49000, (batch, 77)).astype(np.int64)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0
    if which == "l":
        from transformers import CLIPTextConfig

        port = FrozenCLIPEmbedder(cc.clip_l)
        prefix, rules, cfg = "conditioner.embedders.0.transformer.", clip_l_rules(cc.clip_l), cc.clip_l
        ref = HFText(CLIPTextConfig(**_hf_kwargs(text_encoder_config(cfg))))
    else:
        from transformers import CLIPTextConfig

        port = FrozenOpenCLIPEmbedder2(cc.clip_g)
        prefix, rules, cfg = "conditioner.embedders.1.model.", clip_g_rules(cc.clip_g), cc.clip_g
        ref = CLIPTextModelWithProjection(CLIPTextConfig(**_hf_kwargs(text_encoder_config(cfg))))
    sub = "transformer." if which == "l" else "model."
    randomize(port, SEED, prefix[:-len(sub)])
    from sdxl_ms.weights.keymap import convert_to_diffusers
    from sdxl_ms.weights.state import named_parameters

    params = named_parameters(port, prefix[:-len(sub)])
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
          convert_to_diffusers(_prefixed(rules, prefix), lambda n: params[n].asnumpy())}
    ref_keys = set(ref.state_dict())
    if not any(k.startswith("text_model.") for k in ref_keys):  # transformers 5: no prefix
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing = ref_keys - set(sd)
    if missing:  # a silently half-loaded reference would make every rel-L2 meaningless
        raise RuntimeError(f"reference text encoder: {len(missing)} weights not loaded, "
                           f"e.g. {sorted(missing)[:3]}")
    ref.load_state_dict({k: v for k, v in sd.items() if k in ref_keys}, strict=True)
    ref.eval()

    def torch_fn():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
        return out.hidden_states[-2].numpy()

    def port_out(o):
        return o if which == "l" else o[0]
    return port, (ms.Tensor(ids.astype(np.int32)),), torch_fn, port_out


def _prefixed(rules, prefix):
    from sdxl_ms.weights.keymap import KeyRule

    return [KeyRule(tuple(prefix + n for n in r.sgm), r.diffusers, r.kind) for r in rules]


def _hf_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures",)}


def run_cases(cases: Sequence[Case], rounds: int, modes: Sequence[str]) -> List[Dict]:
    """Each layer: port (in every jit mode asked for) and torch, interleaved; medians."""
    rows = []
    totals: Dict[Tuple[str, str], List[float]] = {}
    for case in cases:
        built = case.build()
        port, args, torch_fn, extra = built
        fn = port_call(port, extra)
        want = torch_fn()
        for mode in modes:
            set_jit(mode)
            t0 = time.perf_counter()
            got = fn(*args)
            first = time.perf_counter() - t0
            tp, tt = paired_times(lambda: fn(*args), torch_fn, rounds)
            err = rel_l2(got, want)
            rows.append({"group": case.group, "layer": case.name, "count": case.count,
                         "jit": mode, "port_s": tp, "torch_s": tt, "ratio": tp / tt,
                         "rel_l2": err, "compile_s": max(first - tp, 0.0)})
            acc = totals.setdefault((case.group, mode), [0.0, 0.0])
            acc[0] += case.count * tp
            acc[1] += case.count * tt
            print(f"{case.group:5s} {case.name:44s} x{case.count:<3d} {mode:6s} port "
                  f"{tp * 1e3:8.1f} ms  torch {tt * 1e3:8.1f} ms  ratio {tp / tt:5.2f}  "
                  f"relL2 {err:.1e}  compile {max(first - tp, 0.0):5.1f} s", flush=True)
        set_jit("off")
        del built, port, fn
    for (group, mode), (p, t) in totals.items():
        print(f"{group:5s} {'estimated whole (sum of count x time)':44s}      {mode:6s} port "
              f"{p:8.2f} s   torch {t:8.2f} s   ratio {p / t:5.2f}", flush=True)
    return rows


def port_call(cell, extra=None):
    """cell(*args) as numpy (a tuple for tuple outputs), `extra` picking the compared output."""
    cell.set_train(False)

    def call(*args):
        out = cell(*args)
        out = tuple(o.asnumpy() for o in out) if isinstance(out, (tuple, list)) else out.asnumpy()
        return extra(out) if callable(extra) else out
    return call


# ---- 3x3 convolutions at every sdxl-base shape --------------------------------------------------

CONV_SHAPES = [  # (batch, c_in, c_out, size)
    (2, 320, 320, 32), (2, 960, 320, 32), (2, 640, 640, 16), (2, 1920, 640, 16), (2, 1280, 1280, 8),
    (2, 2560, 1280, 8), (1, 512, 512, 32), (1, 512, 512, 64), (1, 512, 512, 128),
    (1, 256, 256, 128), (1, 256, 256, 256), (1, 128, 128, 256), (2, 4, 320, 32), (2, 320, 4, 32)]


def conv_cases() -> List[Case]:
    return [Case("conv", f"conv3x3 B{b} {ci}->{co} @{s}", 1,
                 lambda b=b, ci=ci, co=co, s=s: _conv(ci, co, s, b)) for b, ci, co, s in CONV_SHAPES]


def convs(rounds: int) -> None:
    """Every conv shape: torch, the native kernel and the im2col lowering, interleaved."""
    import sdxl_ms.nn.layers as layers

    for case in conv_cases():
        port, args, torch_fn, _ = case.build()
        fn = port_call(port)
        want = torch_fn()
        times: Dict[str, List[float]] = {"torch": [], "native": [], "im2col": []}
        errs = {}
        for impl in ("native", "im2col"):
            layers._CONV_IMPL.value = impl
            errs[impl] = rel_l2(fn(*args), want)
        for _ in range(rounds):
            times["torch"].append(timed_call(torch_fn))
            for impl in ("native", "im2col"):
                layers._CONV_IMPL.value = impl
                times[impl].append(timed_call(lambda: fn(*args)))
        layers._CONV_IMPL.value = None
        t = {k: float(np.median(v)) for k, v in times.items()}
        print(f"{case.name:36s} torch {t['torch'] * 1e3:8.1f} ms | native {t['native'] * 1e3:8.1f}"
              f" ms ({t['native'] / t['torch']:4.2f}x) | im2col {t['im2col'] * 1e3:8.1f} ms "
              f"({t['im2col'] / t['torch']:4.2f}x) | relL2 {max(errs.values()):.0e}", flush=True)


def _component_inputs(cfg, size: int):
    """Seeded inputs of one full component call: UNet (x, context, vector, t), VAE latents z,
    and token ids (BOS, 19 tokens, EOS, padding) for the text encoders."""
    lat = size // 8
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((2, 4, lat, lat)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, cfg.unet.context_dim)).astype(np.float32)
    y = rng.standard_normal((2, cfg.unet.adm_in_channels)).astype(np.float32)
    t = np.full((2,), 501.0, np.float32)
    z = rng.standard_normal((1, 4, lat, lat)).astype(np.float32)
    ids = rng.integers(1, 49000, (2, 77)).astype(np.int64)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0
    return x, ctx, y, t, z, ids


# ---- whole components ---------------------------------------------------------------------------

def whole(component: str, side: str, preset: str, size: int, rounds: int, jit: str) -> Dict:
    """One full component alone in this process: first call (compile) and steady time apart,
    and the process's peak RSS (ru_maxrss). unet: one CFG step (batch 2); vae: decode of one
    latent; text: both encoders on [negative, prompt]."""
    from sdxl_ms.config import get_preset

    cfg = get_preset(preset)
    x, ctx, y, t, z, ids = _component_inputs(cfg, size)
    t0 = time.perf_counter()
    if side == "port":
        call = _whole_port(component, cfg, jit, x, t, ctx, y, z, ids)
    else:
        call = _whole_torch(component, cfg, size, x, t, ctx, y, z, ids)
    build_s = time.perf_counter() - t0
    first = timed_call(call)
    times = [timed_call(call) for _ in range(rounds)]
    steady = float(np.median(times))
    rec = {"component": component, "side": side, "preset": preset, "size": size, "jit": jit,
           "build_s": build_s, "first_call_s": first, "compile_s": max(first - steady, 0.0),
           "median_s": steady, "times": times, "peak_rss_gb": peak_rss_gb()}
    print(json.dumps(rec), flush=True)
    return rec


def _whole_port(component, cfg, jit, x, t, ctx, y, z, ids):
    ms = _ms()
    from mindspore.nn.utils import no_init_parameters

    from sdxl_ms.weights.state import randomize

    set_jit(jit)
    if component == "unet":
        from sdxl_ms.models.unet import UNetModel
        with no_init_parameters():
            cell = UNetModel(cfg.unet)
        randomize(cell, SEED, "model.diffusion_model.")
        args = tuple(ms.Tensor(a) for a in (x, t, ctx, y))
        return lambda: cell(*args).asnumpy()
    if component == "vae":
        from sdxl_ms.models.autoencoder import AutoencoderKL
        with no_init_parameters():
            vae = AutoencoderKL(cfg.vae)
        randomize(vae, SEED, "first_stage_model.")
        zt = ms.Tensor(z)
        return lambda: vae.decode(zt).asnumpy()
    from sdxl_ms.models.conditioner import GeneralConditioner
    with no_init_parameters():
        cond = GeneralConditioner(cfg.conditioner)
    randomize(cond, SEED, "conditioner.")
    it = ms.Tensor(ids.astype(np.int32))
    return lambda: [o.asnumpy() for o in cond.encode_text(it, it)]


def _whole_torch(component, cfg, size, x, t, ctx, y, z, ids):
    torch = _torch()
    if component == "unet":
        from diffusers import UNet2DConditionModel

        from sdxl_ms.weights.diffusers_configs import unet_config
        kw = {k: v for k, v in unet_config(cfg.unet, cfg.conditioner.size_embed_dim).items()
              if not k.startswith("_")}
        model = UNet2DConditionModel(**kw).eval()
        # the port's `y` is diffusers' concat(text_embeds, time embedding): feed equivalents
        pooled = torch.from_numpy(y[:, :cfg.conditioner.pooled_dim].copy())
        tids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        return lambda: model(torch.from_numpy(x), torch.from_numpy(t),
                             encoder_hidden_states=torch.from_numpy(ctx),
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample.numpy()
    if component == "vae":
        from diffusers import AutoencoderKL

        from sdxl_ms.weights.diffusers_configs import vae_config
        model = AutoencoderKL(**{k: v for k, v in vae_config(cfg.vae).items()
                                 if not k.startswith("_")}).eval()
        return lambda: model.decode(torch.from_numpy(z)).sample.numpy()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_ms.weights.diffusers_configs import text_encoder_config
    cc = cfg.conditioner
    enc1 = CLIPTextModel(CLIPTextConfig(**_hf_kwargs(text_encoder_config(cc.clip_l)))).eval()
    enc2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**_hf_kwargs(text_encoder_config(cc.clip_g)))).eval()
    tid = torch.from_numpy(ids)
    return lambda: (enc1(tid, output_hidden_states=True).hidden_states[-2].numpy(),
                    enc2(tid, output_hidden_states=True).hidden_states[-2].numpy())


# ---- per-op profile of a whole component ---------------------------------------------------------

def trace(component: str, side: str, preset: str, size: int, top: int) -> None:
    """Where one call's time goes, by op: the port's kernels are timed through wrappers around
    the `ops` functions and MatMul primitives the models call (synchronous launches, so a call's
    wall time is its kernel's); torch's through torch.profiler."""
    from sdxl_ms.config import get_preset

    cfg = get_preset(preset)
    x, ctx, y, t, z, ids = _component_inputs(cfg, size)
    if side == "torch":
        from torch.profiler import ProfilerActivity, profile

        call = _whole_torch(component, cfg, size, x, t, ctx, y, z, ids)
        call()
        total = timed_call(call)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        print(f"torch {component} total {total:.2f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        return
    _ms()
    records: Dict[str, List[float]] = {}
    _install_op_timers(records)
    call = _whole_port(component, cfg, "off", x, t, ctx, y, z, ids)
    call()
    records.clear()
    total = timed_call(call)
    traced = sum(sum(v) for v in records.values())
    print(f"port {component} total {total:.2f} s; in traced kernels {traced:.2f} s; "
          f"the rest (Python, views, Tensor operators) {total - traced:.2f} s")
    for name, v in sorted(records.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {name:24s} {sum(v):8.3f} s  x{len(v)}")


def _install_op_timers(records: Dict[str, List[float]]) -> None:
    import mindspore.ops as real_ops

    import sdxl_ms.models.autoencoder as ae
    import sdxl_ms.models.clip_text as clip
    import sdxl_ms.models.open_clip_text as oclip
    import sdxl_ms.models.unet as unet
    import sdxl_ms.nn.layers as layers

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            records.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return call

    class TimedOps:
        def __getattr__(self, name):
            fn = getattr(real_ops, name)
            return timed(name, fn) if callable(fn) and not isinstance(fn, type) else fn

    for mod in (layers, unet, ae, clip, oclip):
        mod.ops = TimedOps()
    for mod in (layers, unet):
        for name in ("_MM", "_MM_NT", "_MM_TT", "_BMM_TN", "_BMM_NT"):
            if hasattr(mod, name):
                setattr(mod, name, timed(name, getattr(mod, name)))
    if hasattr(layers, "_layer_norm_kernel"):  # the fused LayerNorm primitive
        original = layers._layer_norm_kernel.__wrapped__
        layers._layer_norm_kernel = functools.lru_cache(maxsize=None)(
            lambda eps: timed("LayerNorm", original(eps)))


# ---- tiny preset --------------------------------------------------------------------------------

def tiny(rounds: int, modes: Sequence[str]) -> None:
    """Tiny components and the 4-step pipeline, port (per jit mode) and torch in one process."""
    import tempfile
    from pathlib import Path

    _ms()
    _torch()
    from parity.reference import load_reference
    from sdxl_ms import load_pipeline
    from sdxl_ms.config import TINY
    from sdxl_ms.weights.synthetic import make_checkpoint

    root = Path(tempfile.mkdtemp())
    path = make_checkpoint(TINY, 0, root / "tiny-diffusers", "diffusers")
    port, ref = load_pipeline(path), load_reference(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, TINY.unet.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, TINY.conditioner.pooled_dim)).astype(np.float32)
    tids = np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32)
    lat = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(height=64, width=64, num_inference_steps=4, guidance_scale=5.0)
    work = {
        "text (encode_prompt, 2 prompts)": (lambda: port.encode_prompt("a fox", "blurry"),
                                            lambda: ref.encode_prompt("a fox", "blurry")),
        "UNet step (batch 2)": (lambda: port.unet(x, 501.0, ctx, pooled, tids),
                                lambda: ref.unet(x, 501.0, ctx, pooled, tids)),
        "VAE decode": (lambda: port.decode(lat), lambda: ref.decode(lat)),
        "pipeline 4 steps": (lambda: port("a fox", "blurry", latents=lat, progress=False, **kw),
                             lambda: ref("a fox", "blurry", latents=lat, **kw)),
    }
    for mode in modes:
        set_jit(mode)
        for name, (pf, tf) in work.items():
            first = timed_call(pf)
            tp, tt = paired_times(pf, tf, rounds)
            print(f"tiny  {name:34s} {mode:6s} port {tp * 1e3:8.1f} ms  torch {tt * 1e3:8.1f} ms"
                  f"  ratio {tp / tt:5.2f}  (first call {first:.2f} s)", flush=True)
    set_jit("off")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("blocks", "convs", "tiny", "whole", "trace"))
    ap.add_argument("--part", choices=("unet", "vae", "text", "all"), default="all")
    ap.add_argument("--only", default="", help="substring filter on layer names")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jit", default="off",
                    help="port jit mode(s), comma-separated: off, blocks, model")
    ap.add_argument("--size", type=int, default=256, help="image size (sdxl-base)")
    ap.add_argument("--component", choices=("unet", "vae", "text"), default="unet")
    ap.add_argument("--side", choices=("port", "torch"), default="port")
    ap.add_argument("--preset", default="sdxl-base")
    ap.add_argument("--top", type=int, default=20, help="trace: rows to print")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    modes = [m for m in args.jit.split(",") if m]
    if args.what == "whole":
        whole(args.component, args.side, args.preset, args.size, args.rounds, modes[0])
        return
    if args.what == "trace":
        trace(args.component, args.side, args.preset, args.size, args.top)
        return
    if args.what == "tiny":
        tiny(args.rounds, modes)
        return
    if args.what == "convs":
        convs(args.rounds)
        return
    lat = args.size // 8
    cases = []
    if args.part in ("unet", "all"):
        cases += unet_cases(2, lat)
    if args.part in ("vae", "all"):
        cases += vae_cases(lat)
    if args.part in ("text", "all"):
        cases += text_cases(1) + text_cases(2)
    cases = [c for c in cases if args.only in c.name]
    rows = run_cases(cases, args.rounds, modes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
