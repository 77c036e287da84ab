"""The checkpoints porting engineers hold: MindSpore `.ckpt` (our streaming reader and writer
against MindSpore's own), diffusers folders with `variant="fp16"` files, sgm single files."""
from __future__ import annotations

import numpy as np
import pytest

from sdxl_ms.weights.checkpoint import SgmCheckpoint, detect_format, open_checkpoint
from sdxl_ms.weights.mindspore_ckpt import MindSporeCheckpoint


def test_mindspore_reads_what_make_checkpoint_writes(tiny_checkpoints):
    import mindspore as ms

    ours = ms.load_checkpoint(str(tiny_checkpoints["mindspore"]))
    sgm = SgmCheckpoint(tiny_checkpoints["sgm"])
    assert set(ours) == set(sgm.shapes)
    for name in list(sgm.shapes)[::97]:
        np.testing.assert_array_equal(ours[name].asnumpy(), sgm.get(name))


def test_we_read_what_mindspore_writes_with_its_own_norm_names(tmp_path):
    import mindspore as ms

    rng = np.random.default_rng(0)
    tensors = {"model.diffusion_model.out.0.gamma": rng.standard_normal(8).astype(np.float32),
               "model.diffusion_model.out.0.beta": rng.standard_normal(8).astype(np.float32),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding."
               "embedding_table": rng.standard_normal((5, 4)).astype(np.float16),
               "model.diffusion_model.out.2.weight": rng.standard_normal((4, 8, 3, 3)).astype(np.float32)}
    path = tmp_path / "w.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in tensors.items()], str(path))
    assert detect_format(path) == "mindspore"
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, MindSporeCheckpoint)
    np.testing.assert_array_equal(ckpt.get("model.diffusion_model.out.0.weight"),
                                  tensors["model.diffusion_model.out.0.gamma"])
    np.testing.assert_array_equal(ckpt.get("model.diffusion_model.out.0.bias"),
                                  tensors["model.diffusion_model.out.0.beta"])
    emb = ckpt.get("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight")
    assert emb.dtype == np.float16 and emb.shape == (5, 4)
    assert ckpt.shapes["model.diffusion_model.out.2.weight"] == (4, 8, 3, 3)


def test_the_port_loads_the_same_weights_from_ckpt_and_safetensors(tiny_checkpoints):
    from sdxl_ms import load_pipeline

    a = load_pipeline(tiny_checkpoints["mindspore"])
    b = load_pipeline(tiny_checkpoints["sgm"])
    pa = dict(a.model.parameters_and_names())
    for name, p in list(b.model.parameters_and_names())[::53]:
        np.testing.assert_array_equal(pa[name].asnumpy(), p.asnumpy())
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(a.decode(z), b.decode(z))


def test_inspect_names_the_mindspore_format(capsys, tiny_checkpoints):
    from sdxl_ms.cli import main

    assert main(["inspect", str(tiny_checkpoints["mindspore"])]) == 0
    out = capsys.readouterr().out
    assert "format: mindspore" in out and "preset: tiny (layout matches exactly)" in out


@pytest.mark.parametrize("fmt", ["sgm", "mindspore", "diffusers"])
def test_the_preset_is_read_from_the_checkpoint_and_a_contrary_one_refused(
        fmt, tiny_checkpoints, tmp_path, capsys):
    """A golden records the preset its checkpoint holds (`check` compares it with the port's
    checkpoint), so `--preset` comes from the layout, and a contradicting one is one line."""
    import argparse

    from parity.cli import _preset, main

    ckpt = str(tiny_checkpoints[fmt])
    assert _preset(argparse.Namespace(checkpoint=ckpt, preset=None)) == "tiny"
    code = main(["record", "--checkpoint", ckpt, "--preset", "sdxl-base",
                 "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds the 'tiny' layout" in err[0], err
    assert not (tmp_path / "g").exists()


def test_parity_run_from_a_ckpt_passes(tmp_path, tiny_checkpoints):
    """The reference converts the .ckpt to a diffusers folder; the port reads it directly."""
    from parity.recording import RunSpec
    from parity.runner import run

    spec = RunSpec(checkpoint=str(tiny_checkpoints["mindspore"]), samplers=("euler",), steps=2)
    report = run(spec, tmp_path / "r")
    assert report.ok, report.headline()


@pytest.fixture(scope="module")
def fp16_variant(tmp_path_factory):
    from sdxl_ms.config import TINY
    from sdxl_ms.weights.synthetic import make_checkpoint

    return make_checkpoint(TINY, 0, tmp_path_factory.mktemp("v") / "tiny-fp16", "diffusers",
                           variant="fp16")


def test_a_fp16_variant_folder_holds_only_variant_files(fp16_variant):
    from sdxl_ms.weights.checkpoint import DiffusersCheckpoint

    assert (fp16_variant / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (fp16_variant / "unet" / "diffusion_pytorch_model.safetensors").exists()
    ckpt = DiffusersCheckpoint(fp16_variant)
    assert ckpt.variant == "fp16" and ckpt.get("unet/conv_in.weight").dtype == np.float16


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_port_loads_a_fp16_variant_into_either_compute_dtype(fp16_variant, tiny_checkpoints,
                                                                 dtype):
    from sdxl_ms import load_pipeline

    pipe = load_pipeline(fp16_variant, dtype)
    full = SgmCheckpoint(tiny_checkpoints["sgm"])
    name = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    got = dict(pipe.model.parameters_and_names())[name].asnumpy()
    np.testing.assert_array_equal(got, full.get(name).astype(np.float16).astype(got.dtype))


def test_parity_run_from_a_fp16_variant_folder_passes(tmp_path, fp16_variant):
    """fp32 compute on both sides from the same float16-rounded weights."""
    from parity.recording import RunSpec
    from parity.runner import run

    report = run(RunSpec(checkpoint=str(fp16_variant), samplers=("euler",), steps=2),
                 tmp_path / "r")
    assert report.ok, report.headline()
    assert report.meta["processes"]["reference"]["peak_rss_bytes"] > 0
