"""`sdxl-parity diff-weights`: every conversion bug injected into one tensor of the tiny
checkpoint, written in another format than the reference's (a diffusers folder), is named by
the transformation that explains it; an untouched checkpoint in another format, and the
fp16-variant folder, compare equal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parity.difference import explain

U, BIG_G, CLIP_L, VAE = ("model.diffusion_model.", "conditioner.embedders.1.model.",
                         "conditioner.embedders.0.transformer.text_model.", "first_stage_model.")


def _transpose(t, n):
    t[n] = np.ascontiguousarray(t[n].T)


def _rotate(t, n):
    t[n] = np.ascontiguousarray(t[n][:, :, ::-1, ::-1])


def _flip_w(t, n):
    t[n] = np.ascontiguousarray(t[n][:, :, :, ::-1])


def _q_v(t, n):
    q, k, v = np.split(t[n], 3)
    t[n] = np.concatenate([v, k, q])


def _halves(t, n):
    a, b = np.split(t[n], 2)
    t[n] = np.concatenate([b, a])


def _reverse(t, n):
    t[n] = np.ascontiguousarray(t[n][::-1])


def _scale(t, n):
    t[n] = t[n] / np.float32(0.13025)


def _swap_bias(t, n):
    b = n.replace(".weight", ".bias")
    t[n], t[b] = t[b].copy(), t[n].copy()


def _copy_from_layer_0(t, n):
    t[n] = t[n.replace("layers.1.", "layers.0.")].copy()


def _zeros(t, n):
    t[n] = np.zeros_like(t[n])


# tensor: (mutation, verdict kind, text the verdict holds)
BUGS = {
    f"{U}output_blocks.0.1.transformer_blocks.0.attn1.to_k.weight":
        (_transpose, "transposed", "transposed"),
    f"{U}input_blocks.1.0.in_layers.2.weight":
        (_rotate, "rotated", "its kernel rotated by 180 degrees"),
    f"{U}output_blocks.1.0.in_layers.2.weight":
        (_flip_w, "flipped", "its kernel flipped horizontally"),
    f"{BIG_G}transformer.resblocks.1.attn.in_proj_weight":
        (_q_v, "permuted", "its q, k, v rows hold the reference's v, k, q"),
    f"{U}input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight":
        (_halves, "rolled", "its two halves along axis 0 swapped"),
    f"{CLIP_L}encoder.layers.2.mlp.fc1.weight":
        (_reverse, "reversed", "reversed along axis 0"),
    f"{U}out.2.bias": (_scale, "scaled", "scaled by 7.67754 (1 / 0.13025)"),
    f"{VAE}decoder.mid.block_1.norm1.weight":
        (_swap_bias, "swapped", "the reference's bias (swapped with it)"),
    f"{CLIP_L}encoder.layers.1.mlp.fc2.weight":
        (_copy_from_layer_0, "equals_other",
         f"equal to the reference's conditioner.embedders.0.transformer.text_model.encoder."
         "layers.0.mlp.fc2.weight"),
    f"{U}middle_block.0.out_layers.3.bias":
        (_zeros, "fresh_init", "all zeros: the statistics of a fresh init"),
}


def _diff(tmp_path, capsys, reference, port, *extra):
    from parity.cli import main

    code = main(["diff-weights", str(reference), str(port), "--out", str(tmp_path / "rep"),
                 "--quiet", *extra])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "rep" / "diff-weights.json").read_text())
    return code, out, report


def test_each_conversion_bug_is_named_by_its_transformation(tmp_path, capsys,
                                                            tiny_checkpoints):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny_checkpoints["sgm"]))
    for name, (mutate, _, _) in BUGS.items():
        mutate(tensors, name)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    code, out, report = _diff(tmp_path, capsys, tiny_checkpoints["diffusers"], broken)
    assert code == 1
    found = {t["name"]: t for t in report["tensors"] if t["kind"] not in ("equal", "rounding")}
    swapped_bias = f"{VAE}decoder.mid.block_1.norm1.bias"  # the other side of the swap
    assert set(found) == set(BUGS) | {swapped_bias}
    for name, (_, kind, text) in BUGS.items():
        assert (found[name]["kind"], text in found[name]["text"]) == (kind, True), found[name]
    assert found[swapped_bias]["text"] == "the reference's weight (swapped with it)"
    assert out.startswith(f"FAIL: {len(BUGS) + 1} of 955 tensors differ; first: ")
    assert (tmp_path / "rep" / "diff-weights.md").read_text().startswith("FAIL: ")


def test_a_bug_in_a_mindspore_ckpt_with_mindspore_spellings_is_named(tmp_path, capsys,
                                                                     tiny_checkpoints):
    """MindSpore's .ckpt spells norm weights gamma/beta: aligned all the same."""
    from sdxl_ms.weights.mindspore_ckpt import MindSporeCheckpoint, write_ckpt

    source = MindSporeCheckpoint(tiny_checkpoints["mindspore"])
    name = f"{U}input_blocks.1.0.in_layers.2.weight"
    broken = tmp_path / "broken.ckpt"
    with open(broken, "wb") as f:
        write_ckpt(f, ((n, np.ascontiguousarray(source.get(n)[:, :, ::-1, ::-1]) if n == name
                        else source.get(n)) for n in source.shapes))
    code, out, report = _diff(tmp_path, capsys, tiny_checkpoints["diffusers"], broken)
    assert code == 1
    assert [(t["name"], t["kind"]) for t in report["tensors"]
            if t["kind"] not in ("equal", "rounding")] == [(name, "rotated")]


@pytest.mark.parametrize("port, summary", [
    ("mindspore", "PASS: 955 tensors equal"),
    ("sgm", "PASS: 955 tensors equal"),
])
def test_an_untouched_checkpoint_in_another_format_is_exit_0(tmp_path, capsys,
                                                              tiny_checkpoints, port, summary):
    code, out, report = _diff(tmp_path, capsys, tiny_checkpoints["diffusers"],
                              tiny_checkpoints[port])
    assert code == 0 and out.splitlines()[0] == summary and report["ok"]


def test_the_fp16_variant_folder_is_equal_up_to_float16_rounding(tmp_path, capsys,
                                                                 tiny_checkpoints):
    from sdxl_ms.config import TINY
    from sdxl_ms.weights.synthetic import make_checkpoint

    fp16 = make_checkpoint(TINY, 0, tmp_path / "fp16", "diffusers", variant="fp16")
    code, out, report = _diff(tmp_path, capsys, tiny_checkpoints["sgm"], fp16)
    assert code == 0
    assert out.splitlines()[0] == "PASS: 955 tensors equal up to float16 rounding"
    assert {(t["kind"], t["text"]) for t in report["tensors"]} == {
        ("rounding", "equal up to float16 rounding")}


def test_a_missing_file_is_one_line_exit_2(tmp_path, capsys, tiny_checkpoints):
    from parity.cli import main

    code = main(["diff-weights", str(tiny_checkpoints["sgm"]), str(tmp_path / "nope.ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope.ckpt" in err


# ---- the classifier on activations (wiring bugs move whole tensors too) -------------------------

def test_explain_names_activation_transformations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 96, 4, 4))
    noisy = lambda a: a + 1e-6 * rng.standard_normal(a.shape)  # noqa: E731 - compute noise
    concat_other_order = np.concatenate([x[:, 40:], x[:, :40]], axis=1)  # blocks 40 + 56
    found = explain(x, noisy(concat_other_order), tol=1e-3, channel_axis=1)
    assert found.kind == "rolled" and found.detail == {"axis": 1, "split": 40}
    halves = np.concatenate([x[:, 48:], x[:, :48]], axis=1)
    found = explain(x, noisy(halves), tol=1e-3, channel_axis=1)
    assert found.text == "its two halves along axis 1 swapped" and found.kind == "rolled"
    found = explain(x, noisy(x * 0.13025 ** 2), tol=1e-3)
    assert found.kind == "scaled" and "0.13025^2" in found.text
    assert explain(x, noisy(x), tol=1e-3).kind == "unexplained"  # noise above tol=rounding
    assert explain(x, x.astype(np.float16), dtype="float16").kind == "rounding"
    found = explain(x, rng.standard_normal(x.shape), tol=1e-3)
    assert found.kind == "unexplained" and found.rel_l2 > 1
