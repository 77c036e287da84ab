"""Checkpoint formats, key maps, layouts and the loader's errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import read_reference_keys
from sdxl_ms import load_pipeline
from sdxl_ms.cli import main as ms_main
from sdxl_ms.config import SDXL_BASE, SMALL, TINY
from sdxl_ms.weights.checkpoint import SgmCheckpoint, detect_format
from sdxl_ms.weights.keymap import convert_to_diffusers, convert_to_sgm, pipeline_rules
from sdxl_ms.weights.loader import expected_layout
from sdxl_ms.weights.random_init import random_tensor
from sdxl_ms.weights.safetensors_io import CheckpointError


def test_keys_cli_equals_public_checkpoint_list(capsys):
    assert ms_main(["keys", "--preset", "sdxl-base", "--format", "sgm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = {f"{k}:{v}" for k, v in read_reference_keys().items()}
    assert len(lines) == len(want) == 2514
    assert set(lines) == want


def test_keys_cli_diffusers_format_names_components(capsys):
    assert ms_main(["keys", "--preset", "tiny", "--format", "diffusers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split("/")[0] for line in lines} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2/text_projection.weight:(64, 64)" in lines


@pytest.mark.parametrize("cfg", [TINY, SMALL, SDXL_BASE], ids=["tiny", "small", "sdxl-base"])
def test_key_map_round_trip_is_exact(cfg):
    """sgm -> diffusers -> sgm returns every tensor bit for bit (transposes, qkv splits, 1x1)."""
    rules = pipeline_rules(cfg)
    shapes = expected_layout(cfg, "sgm")
    small = [r for r in rules if all(np.prod(shapes[n]) < 3_000_000 for n in r.sgm)]
    get = lambda n: random_tensor(1, n, shapes[n])  # noqa: E731
    diffusers = dict(convert_to_diffusers(small, get))
    back = dict(convert_to_sgm(small, diffusers.__getitem__))
    assert back.keys() == {n for r in small for n in r.sgm}
    for n, t in back.items():
        np.testing.assert_array_equal(t, get(n), err_msg=n)


def test_text_projection_is_transposed_in_diffusers(tiny_checkpoints):
    sgm = load_file(str(tiny_checkpoints["sgm"]))
    te2 = load_file(str(tiny_checkpoints["diffusers"] / "text_encoder_2" / "model.safetensors"))
    p = sgm["conditioner.embedders.1.model.text_projection"]
    assert not np.allclose(p, p.T)  # a non-symmetric matrix, so the test can tell
    np.testing.assert_array_equal(te2["text_projection.weight"], p.T)


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_checkpoints):
    from sdxl_ms.weights.synthetic import make_checkpoint

    again = make_checkpoint(TINY, 0, tmp_path / "again.safetensors", "sgm")
    other = make_checkpoint(TINY, 1, tmp_path / "other.safetensors", "sgm")
    assert again.read_bytes() == tiny_checkpoints["sgm"].read_bytes()
    assert other.read_bytes() != again.read_bytes()


def test_detects_formats(tiny_checkpoints):
    assert detect_format(tiny_checkpoints["sgm"]) == "sgm"
    assert detect_format(tiny_checkpoints["diffusers"]) == "diffusers"


def _edited_copy(tmp_path, src, edit):
    state = load_file(str(src))
    edit(state)
    out = tmp_path / "edited.safetensors"
    save_file(state, str(out))
    return out


def test_missing_extra_and_misshaped_names_listed_in_one_error(tmp_path, tiny_checkpoints):
    def edit(state):
        del state["model.diffusion_model.out.2.bias"]
        state["model.diffusion_model.extra.weight"] = np.zeros(3, np.float32)
        state["first_stage_model.quant_conv.bias"] = np.zeros(5, np.float32)

    path = _edited_copy(tmp_path, tiny_checkpoints["sgm"], edit)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing: model.diffusion_model.out.2.bias" in msg
    assert "1 unexpected: model.diffusion_model.extra.weight" in msg
    assert "first_stage_model.quant_conv.bias (5,) != expected (8,)" in msg


def test_position_ids_buffer_is_tolerated(tmp_path, tiny_checkpoints):
    def edit(state):
        state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
            np.arange(77, dtype=np.int64)[None]

    path = _edited_copy(tmp_path, tiny_checkpoints["sgm"], edit)
    assert load_pipeline(path).cfg.name == "tiny"


@pytest.mark.parametrize("fmt,name,message", [
    ("sgm", "cut.safetensors", "truncated or corrupt"),
    ("mindspore", "cut.ckpt", "not a MindSpore checkpoint or is truncated")])
def test_truncated_file_is_a_clear_error(tmp_path, tiny_checkpoints, fmt, name, message):
    from sdxl_ms.weights.checkpoint import open_checkpoint

    data = tiny_checkpoints[fmt].read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(cut)
    assert ms_main(["inspect", str(cut)]) == 2


def test_missing_component_in_diffusers_folder(tmp_path, tiny_checkpoints):
    import shutil

    folder = tmp_path / "d"
    shutil.copytree(tiny_checkpoints["diffusers"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no vae/diffusion_pytorch_model.safetensors"):
        load_pipeline(folder)


def test_inspect_reports_format_and_preset(capsys, tiny_checkpoints):
    assert ms_main(["inspect", str(tiny_checkpoints["diffusers"])]) == 0
    out = capsys.readouterr().out
    assert "format: diffusers" in out and "preset: tiny (layout matches exactly)" in out


def test_diffusers_folder_has_sdxl_scheduler_and_pipeline_index(tiny_checkpoints):
    folder = tiny_checkpoints["diffusers"]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert sched["timestep_spacing"] == "leading" and sched["steps_offset"] == 1
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True


def test_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import sdxl_ms; sdxl_ms.random_pipeline"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_checkpoint_cli_refuses_to_overwrite(tmp_path, capsys):
    from parity.cli import main as parity_main

    out = tmp_path / "t.safetensors"
    assert parity_main(["make-checkpoint", "--preset", "tiny", "--seed", "0", "--out", str(out),
                        "--format", "sgm"]) == 0
    assert parity_main(["make-checkpoint", "--out", str(out), "--format", "sgm"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cast_before_or_after_the_weights_holds_the_same_bits(dtype):
    """Precision is a load-time cast: casting the unallocated float32 build and then assigning
    equals assigning in float32 and then casting, bit for bit; networks compute in it."""
    import mindspore as ms

    from sdxl_ms.models.sdxl import build_sdxl
    from sdxl_ms.nn.precision import cast
    from sdxl_ms.pipeline import resolve_dtype
    from sdxl_ms.weights.state import randomize

    ms_dtype = resolve_dtype(dtype)
    before = cast(build_sdxl(TINY), ms_dtype)
    randomize(before, seed=1)
    after = build_sdxl(TINY)
    randomize(after, seed=1)
    assert after.dtype == after.unet.dtype == after.first_stage_model.dtype != ms_dtype
    cast(after, ms_dtype)
    assert before.dtype == after.dtype == after.first_stage_model.dtype == ms_dtype
    for (name, p), (_, q) in zip(before.parameters_and_names(), after.parameters_and_names()):
        assert p.dtype == q.dtype == ms_dtype, name
        # widening to float32 is exact and one-to-one: equal float32 bytes are equal bits
        bits = [t.astype(ms.float32).asnumpy().tobytes() for t in (p, q)]
        assert bits[0] == bits[1], name
