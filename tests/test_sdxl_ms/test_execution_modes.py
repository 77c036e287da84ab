"""Every execution path of the port against diffusers: the three jit modes of
`runtime.settings.set_jit` (PyNative, shared block graphs, whole-model graphs). The speed work must not move a result past fp32 rounding, so each
path meets the same 1e-5 relative-L2 bound as the component-parity tests, on the tiny
checkpoint, through the stage contract.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_l2
from parity.reference import load_reference
from sdxl_ms import load_pipeline, runtime
from sdxl_ms.nn import layers

PROMPT = "a red cube on a blue table, studio light"
TOL = 1e-5
# float16 block graphs against float16 PyNative, tiny text encoders: *measured* 7.5e-4 to
# 1.0e-3 rel L2 (graph compilation rounds differently: the float16 port-vs-reference error
# is the same size, so the harness runs float16 checks in PyNative); 2x headroom
FLOAT16_GRAPH_TOL = 2e-3


@pytest.fixture(scope="module")
def ref(tiny_checkpoints):
    return load_reference(tiny_checkpoints["diffusers"])


@pytest.fixture(scope="module")
def port(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["sgm"])


@pytest.fixture(scope="module")
def wanted(ref):
    """The reference's outputs for one call of each stage."""
    rng = np.random.default_rng(11)
    cond = ref.encode_prompt(PROMPT, "blurry")
    unet_args = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.float32(700.0),
                 np.concatenate([cond["negative_prompt_embeds"], cond["prompt_embeds"]]),
                 np.concatenate([cond["negative_pooled_prompt_embeds"],
                                 cond["pooled_prompt_embeds"]]),
                 np.concatenate([cond["negative_add_time_ids"], cond["add_time_ids"]]))
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    return {"cond": cond, "unet_args": unet_args, "unet": ref.unet(*unet_args),
            "latents": latents, "decode": ref.decode(latents)}


@pytest.fixture
def jit():
    before = runtime.settings.jit_state()
    yield runtime.settings.set_jit
    runtime.settings.restore_jit(before)


def check_stages(port, wanted):
    got = port.encode_prompt(PROMPT, "blurry")
    for key, want in wanted["cond"].items():
        assert rel_l2(got[key], want) <= TOL, key
    unet = port.unet(*wanted["unet_args"])
    assert wanted["unet"].std() > 0.1 and rel_l2(unet, wanted["unet"]) <= TOL
    assert rel_l2(port.decode(wanted["latents"]), wanted["decode"]) <= TOL


def test_pynative_matches_diffusers(port, wanted):
    assert runtime.settings.jit == "off"
    check_stages(port, wanted)


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_jit_modes_match_diffusers(port, wanted, jit, mode):
    jit(mode)
    assert runtime.settings.jit == mode
    check_stages(port, wanted)
    compiled = compile_count()
    check_stages(port, wanted)  # the second call runs the cached graphs: no compile
    assert compile_count() == compiled


def test_each_network_runs_in_the_mode_picked_for_it(port, wanted, jit):
    """Modes picked per network (the harness's choice at sdxl-base 1024x1024: UNet in blocks,
    VAE in PyNative): each network compiles only what its own mode compiles, every result
    still meets diffusers', and the harness's eager context still runs everything eagerly."""
    settings = runtime.settings
    settings.pick_jit("off", "test", {"unet": "model", "vae": "blocks"})
    unet = port.model.model.diffusion_model
    vae_block = port.model.first_stage_model.decoder.mid.block_1
    text_layer = next(c for _, c in port.model.conditioner.embedders[0].cells_and_names()
                      if getattr(c, "graph_unit", False))
    for cell in (unet, vae_block, text_layer):
        for attr in ("_sdxl_model_graphs", "_sdxl_unit_graph"):
            cell.__dict__.pop(attr, None)
    check_stages(port, wanted)
    assert unet.__dict__.get("_sdxl_model_graphs")  # the UNet as one graph
    assert "_sdxl_unit_graph" in vae_block.__dict__  # the VAE's blocks as graphs
    assert "_sdxl_unit_graph" not in text_layer.__dict__  # the text encoders in PyNative
    assert settings.active_jit() == "off"  # between networks: the overall mode
    with port.eager():
        with settings.running("unet"):
            assert settings.active_jit() == "off"
    assert settings.network_jit == {"unet": "model", "vae": "blocks"}
    jit("blocks")  # an explicit mode applies to every network
    assert settings.network_jit == {}


def compile_count() -> int:
    """Graphs ms.jit has compiled in this process (its phase cache; MindSpore 2.10 keeps it in
    mindspore.graph.api): a graph that recompiles on every call shows as growth here."""
    from mindspore.graph import api
    return len(api.ms_compile_cache)


def _scaled_gelu(x):
    return layers.gelu(x) * 1.01


def test_block_graphs_follow_a_patched_activation(port, jit):
    """The text layers hand their activation to the block graph as a bound constant: a
    patched one (the mutant tests patch it) compiles its own graph, restoring it reuses the
    first, and neither recompiles on a repeated call."""
    jit("blocks")
    enc = port.model.conditioner.embedders[1]
    mlp = next(c for _, c in enc.cells_and_names() if hasattr(c, "act"))
    before = port.encode_prompt(PROMPT)["prompt_embeds"]
    act = mlp.act
    try:
        mlp.act = _scaled_gelu
        patched = port.encode_prompt(PROMPT)["prompt_embeds"]
        compiled = compile_count()
        assert np.array_equal(port.encode_prompt(PROMPT)["prompt_embeds"], patched)
        assert compile_count() == compiled
    finally:
        mlp.act = act
    assert rel_l2(patched, before) > 1e-4
    assert np.array_equal(port.encode_prompt(PROMPT)["prompt_embeds"], before)


def test_model_graph_follows_a_patched_layer(port, wanted, jit):
    """A graph freezes the Python it traced: a changed norm epsilon must recompile, not be
    ignored (the mutant tests patch layers like this)."""
    jit("model")
    before = port.decode(wanted["latents"])
    norm = port.model.first_stage_model.decoder.norm_out
    eps = norm.eps
    try:
        norm.eps = 1e-1
        patched = port.decode(wanted["latents"])
    finally:
        norm.eps = eps
    assert rel_l2(patched, before) > 1e-3
    assert rel_l2(port.decode(wanted["latents"]), before) == 0.0


def test_jit_mode_names(jit):
    for given, mode in [(False, "off"), (True, "blocks"), ("1", "blocks"), ("MODEL", "model")]:
        jit(given)
        assert runtime.settings.jit == mode
    with pytest.raises(ValueError, match="jit mode must be one of off, blocks, model"):
        jit("fast")


@pytest.mark.parametrize("variable, value, message", [
    ("SDXL_MS_THREADS", "two", "SDXL_MS_THREADS must be a whole number of threads, got 'two'"),
    ("SDXL_MS_JIT", "fast", "SDXL_MS_JIT: jit mode must be one of off, blocks, model, got 'fast'"),
])
def test_bad_switch_values_name_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as err:
        runtime.ExecutionSettings().read_env()
    assert str(err.value) == message


def test_setters_override_the_environment(monkeypatch):
    monkeypatch.setenv("SDXL_MS_JIT", "model")
    monkeypatch.setenv("SDXL_MS_THREADS", "0")
    fresh = runtime.ExecutionSettings()
    fresh.read_env()
    assert (fresh.jit, fresh.threads) == ("model", None)
    fresh.set_jit("blocks")
    fresh.set_threads(1)
    fresh.read_env()
    assert (fresh.jit, fresh.threads) == ("blocks", 1)


def numpy_attention(x, ctx, wq, wk, wv, heads, causal):
    """Independent float64 reference: per image, per head softmax(q k^T / sqrt(d)) v."""
    q, k, v = x @ wq.T, ctx @ wk.T, ctx @ wv.T
    d = q.shape[-1] // heads
    out = np.empty_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        scores = q[..., s] @ np.swapaxes(k[..., s], -1, -2) / np.sqrt(d)
        if causal:
            scores = scores + np.triu(np.full(scores.shape[-2:], -np.inf), k=1)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[..., s] = (p / p.sum(-1, keepdims=True)) @ v[..., s]
    return out


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "causal"])
def test_attention_paths_match_numpy(per_image, kind):
    """Both attention layouts: all images in one masked call (small shapes) and one call per
    image (what full-size shapes take, above `_BATCHED_SCORES_MAX`)."""
    import mindspore as ms

    rng = np.random.default_rng(4)
    batch, length, dim, heads = 2, 12, 16, 4
    ctx_len, ctx_dim = (7, 24) if kind == "cross" else (length, dim)
    x = rng.standard_normal((batch, length, dim))
    ctx = rng.standard_normal((batch, ctx_len, ctx_dim))
    wq, wk, wv = (rng.standard_normal((dim, d)) * 0.3 for d in (dim, ctx_dim, ctx_dim))
    want = numpy_attention(x, x if kind != "cross" else ctx, wq, wk, wv, heads, kind == "causal")
    t = lambda a: ms.Tensor(np.ascontiguousarray(a, np.float32))  # noqa: E731
    out_t = layers.attention_t(t(x.reshape(-1, dim)),
                               None if kind != "cross" else t(ctx.reshape(-1, ctx_dim)),
                               batch, heads, t(wq), t(wk), t(wv), causal=kind == "causal",
                               per_image=per_image)
    got = out_t.asnumpy().T.reshape(batch, length, dim)
    assert rel_l2(got, want) <= 1e-6


def test_float16_block_graphs_match_pynative(tiny_checkpoints, jit):
    """The reduced-precision paths (the attention core's float32 products, the norms'
    upcasts) compile too: the text encoders in float16 as block graphs give PyNative's
    float16 embeddings within a few float16 roundings, not bit for bit."""
    port16 = load_pipeline(tiny_checkpoints["sgm"], "float16")
    eager = port16.encode_prompt(PROMPT, "blurry")
    jit("blocks")
    graphs = port16.encode_prompt(PROMPT, "blurry")
    for key, want in eager.items():
        if np.any(want):
            assert rel_l2(graphs[key], want) <= FLOAT16_GRAPH_TOL, key


@pytest.mark.parametrize("d", [64, 48])
def test_attention_scale_on_q_gives_the_bits_of_scaling_the_scores(d):
    """1/sqrt(64) is a power of two, so `attention_heads_t` applies it to q (L-fold fewer
    products than on the scores) and must still give the bits of softmax(q^T k * scale) v;
    1/sqrt(48) is not, and takes the scores' multiply."""
    import mindspore as ms
    from mindspore import ops

    rng = np.random.default_rng(7)
    heads, length = 2, 40
    q, k, v = (ms.Tensor(rng.standard_normal((heads * d, length)).astype(np.float32))
               for _ in range(3))
    scores = ops.BatchMatMul(transpose_a=True)(q.reshape(heads, d, length),
                                               k.reshape(heads, d, length))
    probs = ops.softmax(scores * (1.0 / np.sqrt(d)), axis=-1)
    want = ops.BatchMatMul(transpose_b=True)(v.reshape(heads, d, length), probs)
    got = layers.attention_heads_t(q, k, v, heads)
    assert layers._exact_scale(1.0 / np.sqrt(d)) == (d == 64)
    np.testing.assert_array_equal(got.asnumpy(), want.reshape(heads * d, length).asnumpy())


def _seeded(module, dtype, seed: int):
    """`module` with random weights (scaled for unit-size activations), cast to `dtype`."""
    import mindspore as ms

    from sdxl_ms.nn.precision import cast

    rng = np.random.default_rng(seed)
    for param in module.get_parameters():
        fan_in = param.shape[-1] if len(param.shape) > 1 else 1
        param.set_data(ms.Tensor((rng.standard_normal(param.shape) / np.sqrt(fan_in))
                                 .astype(np.float32)))
    return cast(module, dtype)


def _attentions(dtype, length: int):
    """(module, inputs, q/k/v children) of the built-in port's two attentions with projection
    children: CLIP-L's causal self-attention and the UNet's cross-attention."""
    import mindspore as ms

    from sdxl_ms.config import TINY
    from sdxl_ms.models.clip_text import CLIPAttention
    from sdxl_ms.models.unet import CrossAttention

    rng = np.random.default_rng(3)
    batch, width, ctx_width = 2, 32, 24
    x = ms.Tensor(rng.standard_normal((batch * length, width)).astype(np.float32)).astype(dtype)
    ctx = ms.Tensor(rng.standard_normal((batch * 77, ctx_width)).astype(np.float32)).astype(dtype)
    clip = _seeded(CLIPAttention(TINY.conditioner.clip_l), dtype, 0)
    xc = ms.Tensor(rng.standard_normal((batch * 77, TINY.conditioner.clip_l.width)).astype(np.float32)
                   ).astype(dtype)
    cross = _seeded(CrossAttention(width, ctx_width, 2, 16), dtype, 1)
    own = _seeded(CrossAttention(width, width, 2, 16), dtype, 2)
    return [(clip, (xc, batch), (clip.q_proj, clip.k_proj, clip.v_proj)),
            (cross, (x, ctx, batch), (cross.to_q, cross.to_k, cross.to_v)),
            (own, (x, None, batch), (own.to_q, own.to_k, own.to_v))]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("length", [64, 512], ids=["batched", "per-image"])
def test_a_watched_attention_computes_the_bits_of_an_unwatched_one(dtype, length):
    """With a hook on its projections (the harness watching), an attention takes q, k and v
    from its children's calls, all images at once, and attends image by image on column
    blocks where the unwatched path projects image by image (512 tokens: past
    `_BATCHED_SCORES_MAX`): the same bits either way, so what `locate` runs is what `check`
    ran."""
    import mindspore as ms

    seen = []
    for module, inputs, children in _attentions(getattr(ms, dtype), length):
        plain = module(*inputs).asnumpy()
        handles = [child.register_forward_hook(lambda cell, args, out: seen.append(out.shape))
                   for child in children]
        try:
            watched = module(*inputs).asnumpy()
        finally:
            for handle in handles:
                handle.remove()
        np.testing.assert_array_equal(watched, plain)
    # each projection was called once per module call, with every image's rows
    assert len(seen) == 9 and seen[3][0] == 2 * length and seen[0][0] == 2 * 77


def test_a_forward_hook_that_returns_a_value_replaces_the_output():
    """The observer slot does what a MindSpore Cell's forward hook does: a returned value is
    the output from then on, through the plain call and the transposed entry point alike (the
    harness teacher-forces an attention's q, k and v this way)."""
    import mindspore as ms

    (module, inputs, children), = _attentions(ms.float32, 64)[1:2]
    to_v = children[2]
    zero = []
    handle = to_v.register_forward_hook(
        lambda cell, args, out: zero.append(out.shape) or ms.ops.zeros_like(out))
    try:
        out = module(*inputs).asnumpy()
    finally:
        handle.remove()
    # v = 0: every head's output is 0, and the module's output is to_out's bias alone
    bias = module.to_out[0].bias.asnumpy()
    np.testing.assert_allclose(out, np.broadcast_to(bias, out.shape), rtol=0, atol=1e-7)
    assert zero == [(2 * 77, 32)]  # the plain (tokens, out) layout, as the plain call gives
    # the plain call: the VAE attention's 1x1 convolutions (v = 0: x + proj_out's bias)
    from sdxl_ms.config import TINY
    from sdxl_ms.models.autoencoder import AttnBlock

    block = _seeded(AttnBlock(TINY.vae, 32), ms.float32, 4)
    x = ms.Tensor(np.random.default_rng(5).standard_normal((1, 32, 4, 4)).astype(np.float32))
    handle = block.v.register_forward_hook(lambda cell, args, out: ms.ops.zeros_like(out))
    try:
        out = block(x).asnumpy()
    finally:
        handle.remove()
    want = x.asnumpy() + block.proj_out.bias.asnumpy()[None, :, None, None]
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    assert np.abs(block(x).asnumpy() - want).max() > 1e-2  # unhooked: v is v again
