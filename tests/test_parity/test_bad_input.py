"""The bad-input table: every entry point answers bad input with one line naming the problem,
exit code 2, and nothing written. The README's "Bad input" table lists the same cases, with
the messages `tools/bad_input_table.py` captured from these very calls."""
from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"
FAST = ["--steps", "1", "--height", "64", "--width", "64"]


def _tool(name: str) -> Callable[[List[str]], int]:
    if name == "sdxl-ms":
        from sdxl_ms.cli import main
    elif name == "sdxl-parity":
        from parity.cli import main
    else:
        from benchmarks.runner import main
    return main


@dataclass
class Case:
    """`build(tmp, checkpoints)` returns (tool, argv, path that must not appear)."""

    id: str
    input: str  # the README's description of the bad input
    build: Callable[[Path, Dict[str, Path]], Tuple[str, List[str], Optional[Path]]]
    expect: str  # a fragment of the one-line message


# ---- bad files ----------------------------------------------------------------------------


def _sgm_variant(tmp: Path, ckpts, name: str, edit) -> Path:
    tensors = load_file(str(ckpts["sgm"]))
    edit(tensors)
    path = tmp / name
    save_file(tensors, str(path))
    return path


def _drop_one(t):
    del t["model.diffusion_model.out.2.bias"]


def _add_one(t):
    t["model.diffusion_model.extra.weight"] = np.zeros(3, np.float32)


def _reshape_one(t):
    t["model.diffusion_model.out.2.bias"] = np.zeros(5, np.float32)


def _poison_one(t):
    name = "first_stage_model.decoder.conv_out.weight"
    arr = t[name].copy()
    arr.flat[3] = np.nan
    t[name] = arr


def _generate(path: Path, tmp: Path, *extra: str):
    out = tmp / "out.png"
    return "sdxl-ms", ["generate", "--checkpoint", str(path), "--out", str(out), *FAST, *extra], out


def truncated_safetensors(tmp, ckpts):
    data = ckpts["sgm"].read_bytes()
    path = tmp / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return _generate(path, tmp)


def garbage_header(tmp, ckpts):
    path = tmp / "garbage.safetensors"
    path.write_bytes((123456).to_bytes(8, "little") + b"{not json at all" * 10)
    return "sdxl-ms", ["inspect", str(path)], None


def pickle_file(suffix: str):
    def build(tmp, ckpts):
        path = tmp / f"model{suffix}"
        if suffix == ".pt":  # torch.save's zip container, pickle inside
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}))
        else:
            path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
        return _generate(path, tmp)
    return build


def sgm_edit(edit, name):
    def build(tmp, ckpts):
        return _generate(_sgm_variant(tmp, ckpts, name, edit), tmp)
    return build


def diffusers_edit(edit):
    def build(tmp, ckpts):
        folder = tmp / "pipeline"
        shutil.copytree(ckpts["diffusers"], folder)
        edit(folder)
        return _generate(folder, tmp)
    return build


def no_vae(folder: Path):
    shutil.rmtree(folder / "vae")


def corrupt_config(folder: Path):
    (folder / "unet" / "config.json").write_text('{"in_channels": 4,')


def missing_checkpoint(tmp, ckpts):
    return _generate(tmp / "nowhere.safetensors", tmp)


# ---- bad arguments ----------------------------------------------------------------------


def generate_with(*argv: str):
    def build(tmp, ckpts):
        out = tmp / "out.png"
        return "sdxl-ms", ["generate", "--checkpoint", str(ckpts["sgm"]), "--out", str(out),
                           "--steps", "1", *argv], out
    return build


def image_under_file(tmp, ckpts):
    blocker = tmp / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "x.png"
    return "sdxl-ms", ["generate", "--checkpoint", str(ckpts["sgm"]), "--out", str(out)], out


def prompt_file_latin1(tmp, ckpts):
    path = tmp / "prompts.txt"
    path.write_bytes("a caf\u00e9 at night\n".encode("latin-1"))
    return generate_with("--prompt-file", str(path))(tmp, ckpts)


def run_with(*argv: str):
    def build(tmp, ckpts):
        out = tmp / "report"
        return "sdxl-parity", ["run", "--out", str(out), "--quiet", *argv], out
    return build


def check_with(*argv: str, golden: Optional[Callable[[Path], Path]] = None):
    def build(tmp, ckpts):
        out = tmp / "report"
        folder = golden(tmp) if golden else GOLDEN
        return "sdxl-parity", ["check", "--golden", str(folder), "--out", str(out), "--quiet",
                               *argv], out
    return build


def golden_copy(edit):
    def make(tmp: Path) -> Path:
        folder = tmp / "golden"
        shutil.copytree(GOLDEN, folder)
        edit(folder)
        return folder
    return make


def schema_99(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncate_tensors(folder: Path):
    data = (folder / "tensors.safetensors").read_bytes()
    (folder / "tensors.safetensors").write_bytes(data[: len(data) - 1000])


def flip_a_byte(folder: Path):
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-100] ^= 0x01
    (folder / "tensors.safetensors").write_bytes(bytes(data))


def policy_with(text: str):
    def build(tmp, ckpts):
        path = tmp / "policy.toml"
        path.write_text('schema_version = 1\nname = "bad"\n' + text)
        return check_with("--policy", str(path))(tmp, ckpts)
    return build


def existing_file_as_out(tmp, ckpts):
    path = tmp / "report.txt"
    path.write_text("keep me")
    return "sdxl-parity", ["check", "--golden", str(GOLDEN), "--out", str(path)], None


def unwritable_out(tmp, ckpts):
    return "sdxl-parity", ["check", "--golden", str(GOLDEN), "--out", "/proc/sdxl-report"], None


def not_a_recording(tmp, ckpts):
    folder = tmp / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return check_with(golden=lambda t: folder)(tmp, ckpts)


def record_over_folder(tmp, ckpts):
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return "sdxl-parity", ["record", "--out", str(folder), "--steps", "1"], None


def make_checkpoint_exists(tmp, ckpts):
    path = tmp / "tiny.safetensors"
    path.write_bytes(b"old")
    return "sdxl-parity", ["make-checkpoint", "--format", "sgm", "--out", str(path)], None


def bench_compare_malformed(tmp, ckpts):
    bad = tmp / "current.json"
    bad.write_text('{"benchmarks": [ {"name": "x", ')
    base = REPO_ROOT / "benchmarks" / "baselines" / "tiny" / "results.json"
    return "sdxl-bench", ["compare", str(base), str(bad)], None


def bench_with(*argv: str):
    def build(tmp, ckpts):
        out = tmp / "bench"
        return "sdxl-bench", ["--out", str(out), *argv], out
    return build


CASES = [
    Case("truncated-safetensors", "a truncated `.safetensors` checkpoint", truncated_safetensors,
         "not a readable safetensors file"),
    Case("garbage-header", "a `.safetensors` file whose header is garbage", garbage_header,
         "not a readable safetensors file"),
    Case("pickle-ckpt", "a pickled `.ckpt` checkpoint", pickle_file(".ckpt"),
         "is a pickled checkpoint"),
    Case("pickle-bin", "a pickled `.bin` checkpoint", pickle_file(".bin"),
         "never unpickled"),
    Case("pickle-pt", "a `torch.save` `.pt` file (zip of pickles)", pickle_file(".pt"),
         "is a pickled checkpoint"),
    Case("missing-key", "a checkpoint missing a tensor", sgm_edit(_drop_one, "missing.safetensors"),
         "1 missing: model.diffusion_model.out.2.bias"),
    Case("unexpected-key", "a checkpoint with an unexpected tensor",
         sgm_edit(_add_one, "extra.safetensors"), "1 unexpected: model.diffusion_model.extra.weight"),
    Case("misshaped-key", "a checkpoint with a mis-shaped tensor",
         sgm_edit(_reshape_one, "shape.safetensors"), "model.diffusion_model.out.2.bias (5,) != expected"),
    Case("nan-weights", "weights holding NaN or Inf", sgm_edit(_poison_one, "nan.safetensors"),
         "tensor 'first_stage_model.decoder.conv_out.weight' holds 1 NaN/Inf values"),
    Case("diffusers-no-vae", "a diffusers folder missing a component", diffusers_edit(no_vae),
         "has no vae/config.json"),
    Case("diffusers-bad-config", "a diffusers folder with a corrupt `config.json`",
         diffusers_edit(corrupt_config), "config.json is not valid JSON"),
    Case("checkpoint-not-found", "a checkpoint path that does not exist", missing_checkpoint,
         "checkpoint not found"),
    Case("prompt-file-not-utf8", "a prompt file that is not UTF-8", prompt_file_latin1,
         "is not UTF-8 text"),
    Case("size-not-multiple-of-8", "height or width not a multiple of 8",
         generate_with("--height", "100"), "height must be a positive multiple of 8, got 100"),
    Case("steps-zero", "steps < 1", run_with("--steps", "0"), "steps must be >= 1, got 0"),
    Case("guidance-nan", "guidance NaN", generate_with("--guidance", "nan"),
         "guidance must be a finite number, got nan"),
    Case("guidance-negative", "guidance negative", run_with("--guidance", "-2"),
         "guidance must be >= 0, got -2"),
    Case("unknown-sampler", "an unknown sampler", run_with("--sampler", "ddim"),
         "unknown sampler 'ddim'; valid choices:"),
    Case("unknown-schedule", "an unknown schedule", generate_with("--schedule", "cosine"),
         "unknown schedule 'cosine'; valid choices:"),
    Case("no-diffusers-counterpart", "a sampler diffusers cannot compare with",
         run_with("--sampler", "dpmpp_2s_a"), "has no diffusers scheduler to compare with"),
    Case("out-unwritable", "an output folder that cannot be written", unwritable_out,
         "/proc is not writable"),
    Case("out-is-file", "an output path that is an existing file", existing_file_as_out,
         "is an existing file; give a folder"),
    Case("image-under-file", "an image path under an existing file", image_under_file,
         "is a file, not a folder"),
    Case("golden-other-preset", "a golden recorded with another preset",
         check_with("--preset", "sdxl-base"), "was recorded with preset 'tiny', not 'sdxl-base'"),
    Case("golden-other-dtype", "a golden recorded with another dtype",
         check_with("--dtype", "float16"), "was recorded with dtype 'float32', not 'float16'"),
    Case("golden-other-schema", "a golden of another schema version",
         check_with(golden=golden_copy(schema_99)), "has schema_version 99; this tool reads 1"),
    Case("golden-truncated", "a golden whose tensor file is truncated",
         check_with(golden=golden_copy(truncate_tensors)), "is truncated or corrupt"),
    Case("golden-hash-mismatch", "a golden whose tensor file does not match its hash",
         check_with(golden=golden_copy(flip_a_byte)), "does not match the sha256 in its manifest"),
    Case("golden-not-a-recording", "a golden folder that is not a recording", not_a_recording,
         "is not a recording (no manifest.json)"),
    Case("policy-unknown-stage", "a policy with an unknown stage",
         policy_with("[stage.vae.float32]\nrel_l2 = 1e-5\n"), "unknown stage 'vae'"),
    Case("policy-unknown-dtype", "a policy with an unknown dtype",
         policy_with("[stage.unet.fp8]\nrel_l2 = 1e-5\n"), "unknown dtype 'fp8'"),
    Case("policy-unknown-metric", "a policy with an unknown metric",
         policy_with("[stage.unet.float32]\nrel_l3 = 1e-5\n"), "unknown metric 'rel_l3'"),
    Case("policy-warn-looser", "a policy whose warn bound is looser than its fail bound",
         policy_with("[stage.unet.float32]\nrel_l2 = { warn = 1e-3, fail = 1e-5 }\n"),
         "warn 0.001 is looser than fail 1e-05"),
    Case("policy-not-covering", "a policy without bounds for a stage that runs",
         policy_with("[stage.unet.float32]\nrel_l2 = 1e-5\n"), "has no bounds for stage 'tokens'"),
    Case("unknown-stage", "`--stages` naming an unknown stage", check_with("--stages", "unet,vae"),
         "unknown stage(s) vae in --stages"),
    Case("record-over-folder", "`record --out` an existing folder that is not a recording",
         record_over_folder, "exists and is not a recording"),
    Case("checkpoint-exists", "`make-checkpoint --out` an existing file without `--force`",
         make_checkpoint_exists, "already exists (pass --force to replace it)"),
    Case("bench-compare-malformed", "malformed benchmark JSON for `sdxl-bench compare`",
         bench_compare_malformed, "malformed JSON"),
    Case("bench-rounds-zero", "`sdxl-bench --rounds 0`", bench_with("--rounds", "0"),
         "--rounds must be >= 1"),
    Case("argparse-type", "a number argument that is not a number", run_with("--steps", "four"),
         "argument --steps: invalid int value: 'four'"),
]


def run_case(case: Case, tmp: Path, ckpts, capsys) -> Tuple[int, str]:
    tool, argv, must_not_exist = case.build(tmp, ckpts)
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    try:
        code = _tool(tool)(argv)
    except SystemExit as e:  # argparse's own errors exit through SystemExit
        code = e.code
    err = capsys.readouterr().err.strip()
    if must_not_exist is not None:
        assert not must_not_exist.exists(), f"{must_not_exist} was written"
    after = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    assert after == before, f"files appeared: {set(after) - set(before)}"
    return code, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_checkpoints, capsys):
    code, err = run_case(case, tmp_path, tiny_checkpoints, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert case.expect in err, err
    assert ": error: " in err


def test_readme_lists_every_case():
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("## Bad input"):]
    for case in CASES:
        row = next((ln for ln in table.splitlines() if ln.startswith(f"| {case.input} |")), None)
        assert row is not None, f"README has no row for {case.input!r}"
        assert case.expect in row.replace("\\|", "|"), f"README row lacks {case.expect!r}: {row}"


def test_long_prompt_is_a_warning_not_an_error(tmp_path, tiny_checkpoints, capsys):
    """A prompt over 77 tokens still generates, with one warning line that says so."""
    from sdxl_ms.cli import main

    out = tmp_path / "long.png"
    prompt = " ".join(["lighthouse"] * 100)
    assert main(["generate", "--checkpoint", str(tiny_checkpoints["sgm"]), "--prompt", prompt,
                 "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [ln for ln in err if "warning" in ln]
    assert len(warnings) == 1, err
    assert "is 102 tokens; the text encoders read 77" in warnings[0]
    assert out.is_file()
