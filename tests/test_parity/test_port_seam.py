"""The plug-in seam as a porting engineer meets it: a `.py` adapter with graph-mode code, the
README's own example adapter, weight-conversion bugs in the port's checkpoint named at the module
that owns the tensor (golden without module captures), a port that raises while it is being
localised, and a port sampler's UNet inputs checked call by call."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"
ADAPTERS = str(REPO_ROOT / "tests" / "adapters.py")
JIT_ADAPTER = REPO_ROOT / "tests" / "jit_unet_adapter.py"


def _check(out: Path, capsys, *args):
    from parity.cli import main

    code = main(["check", "--golden", str(GOLDEN), "--out", str(out), *args])
    stdout, stderr = capsys.readouterr()
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    return code, stdout, stderr, report


# ---- a .py adapter with ms.jit code -------------------------------------------------------------

def test_jit_adapter_file_passes_and_writes_only_under_out(tmp_path, capsys, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, stdout, _, report = _check(work / "out", capsys, "--quiet",
                                     "--port", f"{JIT_ADAPTER}:make")
    assert code == 0, stdout
    assert stdout.startswith("PASS: 7/7 stages")
    port = report["meta"]["port"]
    assert port["version"] == "jit-unet-adapter 1.0"
    assert port["file_sha256"] == hashlib.sha256(JIT_ADAPTER.read_bytes()).hexdigest()
    assert sorted(os.listdir(work)) == ["out"]
    assert not (work / "out" / "mindspore-dumps").exists()


def test_a_graph_that_fails_to_compile_leaves_its_dumps_in_the_report_folder(
        tmp_path, capsys, monkeypatch):
    adapter = tmp_path / "broken_graph_adapter.py"
    adapter.write_text(JIT_ADAPTER.read_text().replace(
        "return _PIPE.model.unet(x, t, context, vector)",
        "return _PIPE.model.unet(x, t, context, vector) * NOT_DEFINED_ANYWHERE"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, stdout, _, report = _check(work / "out", capsys, "--quiet", "--stages", "unet",
                                     "--port", f"{adapter}:make")
    assert code == 1
    assert stdout.startswith("ERROR at stage 'unet': the port raised ")
    assert len(stdout.splitlines()[0]) < 400  # the first line of MindSpore's message only
    assert "NOT_DEFINED_ANYWHERE" in report["stages"]["unet"]["traceback"]
    assert sorted(os.listdir(work)) == ["out"]
    dumps = list((work / "out" / "mindspore-dumps").rglob("analyze_fail.ir"))
    assert dumps and report["meta"]["compile_dumps"].endswith("mindspore-dumps")


def test_an_adapter_inside_a_package_keeps_its_relative_imports(tmp_path, capsys, monkeypatch):
    package = tmp_path / "team_port"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "graphs.py").write_text(
        "import mindspore as ms\n\nSCALE = 1.0\n\n\n@ms.jit\n"
        "def scaled(x):\n    return x * SCALE\n")
    (package / "adapter.py").write_text(
        "import numpy as np\nfrom mindspore import Tensor\n\n"
        "from adapters import NetworksPort\n\nfrom .graphs import scaled\n\n\n"
        "class Port(NetworksPort):\n"
        "    def decode(self, latents):\n"
        "        return scaled(Tensor(self.pipe.decode(latents))).asnumpy()\n\n\n"
        "make = Port\n")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, stdout, _, report = _check(work / "out", capsys, "--quiet", "--stages", "decode",
                                     "--port", f"{package / 'adapter.py'}:make")
    assert code == 0, stdout
    assert report["meta"]["port"]["class"] == "team_port.adapter.Port"
    assert sorted(os.listdir(work)) == ["out"]


# ---- the README's adapter, unchanged ------------------------------------------------------------

def _readme_adapter() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if b.startswith("# my_port_adapter.py")]
    assert len(found) == 1, "the README has one example adapter"
    return found[0]


def _broken_checkpoint(tiny_checkpoints, tmp_path: Path, mutate) -> Path:
    """The tiny sgm checkpoint with `mutate(tensors)` applied, as a port's converter would
    have written it (same names, same shapes)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny_checkpoints["sgm"]))
    mutate(tensors)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    return path


def _swap(a: str, b: str):
    def mutate(t):
        t[a], t[b] = t[b].copy(), t[a].copy()
    return mutate


def test_readme_adapter_unchanged_runs_check_locate_to_a_report(tmp_path, capsys, monkeypatch,
                                                                tiny_checkpoints):
    (tmp_path / "my_port_adapter.py").write_text(_readme_adapter())
    (tmp_path / "my_sdxl.py").write_text(
        "from sdxl_ms import load_pipeline\n\n\n"
        "def load_model(checkpoint, dtype):\n"
        "    return load_pipeline(checkpoint, dtype=dtype)\n")
    broken = _broken_checkpoint(tiny_checkpoints, tmp_path, _swap(
        "first_stage_model.decoder.mid.block_1.norm1.weight",
        "first_stage_model.decoder.mid.block_1.norm1.bias"))
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr, report = _check(tmp_path / "out", capsys, "--locate",
                                          "--checkpoint", str(broken),
                                          "--stages", "tokens,conditioner,unet,decode",
                                          "--port", "my_port_adapter.py:make")
    assert code == 1, stdout + stderr
    assert stdout.startswith("FAIL at stage 'decode'")
    note = "--locate: this port offers no cells() (parity/contract.py)"
    assert any(line.startswith(f"[sdxl-parity] {note}") for line in stderr.splitlines())
    assert "Traceback" not in stderr
    assert any(n.startswith(note) for n in report["stages"]["decode"]["notes"])
    assert report["meta"]["port"]["modules"].startswith("none")


# ---- weight-conversion bugs, golden without module captures -------------------------------------

def _transpose(name):
    def mutate(t):
        t[name] = np.ascontiguousarray(t[name].T)
    return mutate


def _rotate_180(name):
    def mutate(t):
        t[name] = np.ascontiguousarray(np.rot90(t[name], 2, axes=(2, 3)))
    return mutate


def _swap_q_v(name):
    def mutate(t):
        q, k, v = np.split(t[name], 3)
        t[name] = np.concatenate([v, k, q])
    return mutate


def _reverse_rows(name):
    def mutate(t):
        t[name] = np.ascontiguousarray(t[name][::-1])
    return mutate


UNET, CLIP_L, BIG_G, VAE = ("model.diffusion_model.", "conditioner.embedders.0.transformer.",
                            "conditioner.embedders.1.model.", "first_stage_model.")
CONVERSION_BUGS = {
    # bug: (mutation of the port's checkpoint, failing stage, module named)
    "to_k transposed, output-block transformer": (
        _transpose(f"{UNET}output_blocks.0.1.transformer_blocks.0.attn1.to_k.weight"), "unet",
        "output_blocks.0.1.transformer_blocks.0.attn1.to_k"),
    "ResBlock conv kernel rotated 180 degrees": (
        _rotate_180(f"{UNET}input_blocks.1.0.in_layers.2.weight"), "unet",
        "input_blocks.1.0.in_layers.2"),
    "q and v swapped in a bigG in_proj": (
        _swap_q_v(f"{BIG_G}transformer.resblocks.1.attn.in_proj_weight"), "conditioner",
        "transformer.resblocks.1.attn"),
    "VAE ResBlock norm weight and bias swapped": (
        _swap(f"{VAE}decoder.mid.block_1.norm1.weight", f"{VAE}decoder.mid.block_1.norm1.bias"),
        "decode", "decoder.mid.block_1.norm1"),
}


@pytest.mark.parametrize("bug", list(CONVERSION_BUGS))
def test_a_weight_conversion_bug_is_named_at_the_module_that_owns_the_tensor(
        bug, tmp_path, capsys, tiny_checkpoints):
    mutate, stage, module = CONVERSION_BUGS[bug]
    broken = _broken_checkpoint(tiny_checkpoints, tmp_path, mutate)
    code, stdout, _, report = _check(tmp_path / "out", capsys, "--quiet", "--locate",
                                     "--checkpoint", str(broken))
    assert code == 1
    culprit = report["first_divergent_module"]
    assert (culprit["stage"], culprit["module"]) == (stage, module), stdout
    assert culprit["metric"] == "own rel_l2" and culprit["value"] > 1e-2
    assert stdout.startswith(f"FAIL at stage '{stage}'") and f"module '{module}'" in stdout


@pytest.mark.parametrize("tensor, mutate, verdict, where", [
    ("text_projection", _transpose, "transposed",
     "FAIL at stage 'conditioner', tensor 'neg_none/pooled_prompt_embeds': rel_l2 1.38 > fail "
     "1e-05; --locate: no module over its bound: the difference enters between modules; 1 of "
     f"the port's tensors differ from the golden's weights"),
    ("positional_embedding", _reverse_rows, "reversed along axis 0",
     "FAIL at stage 'conditioner': the input of module 'transformer.resblocks.0' "
     "(text_model.encoder.layers.0) differs from the reference's: different, no simple "
     "transformation of the reference (rel_l2 0.649), while every module before it is within "
     "bounds")])
def test_a_tensor_no_module_owns_is_named_from_the_weights(tmp_path, capsys, tiny_checkpoints,
                                                           tensor, mutate, verdict, where):
    """bigG's text_projection and positional_embedding sit on the text model itself: no
    module's own error moves. The projection's difference enters after the last module (named
    from the port's weights); the positional table's at the first layer's input. Both are
    named by diff-weights against the golden's weights."""
    broken = _broken_checkpoint(tiny_checkpoints, tmp_path, mutate(f"{BIG_G}{tensor}"))
    code, stdout, _, report = _check(tmp_path / "out", capsys, "--quiet", "--locate",
                                     "--checkpoint", str(broken))
    assert code == 1 and report["first_divergent_module"] is None
    headline = stdout.splitlines()[0]
    assert headline.startswith(where), headline
    assert headline.endswith(f"; weights vs the golden's: 1 of 955 tensors differ; first: "
                             f"'{BIG_G}{tensor}' is {verdict}"), headline


def test_a_mutant_in_a_layer_sdxl_never_runs_passes(tmp_path, capsys, tiny_checkpoints):
    """CLIP-L's last layer: SDXL takes its penultimate hidden state."""
    broken = _broken_checkpoint(tiny_checkpoints, tmp_path, _reverse_rows(
        f"{CLIP_L}text_model.encoder.layers.2.mlp.fc1.weight"))
    code, stdout, _, report = _check(tmp_path / "out", capsys, "--quiet", "--locate",
                                     "--checkpoint", str(broken))
    assert code == 0, stdout
    assert report["localisation"] == []


def test_golden_weights_not_on_this_machine_is_one_line_exit_2(tmp_path, capsys,
                                                               tiny_checkpoints):
    from parity.cli import main
    from parity.recording import Recording

    rec = Recording.load(GOLDEN)
    rec.spec.checkpoint = str(tmp_path / "gone.safetensors")
    rec.meta.pop("checkpoint_generator_version", None)
    golden = rec.save(tmp_path / "golden")
    code = main(["check", "--golden", str(golden), "--out", str(tmp_path / "out"), "--locate",
                 "--quiet", "--checkpoint", str(tiny_checkpoints["sgm"])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "gone.safetensors, which is not on this machine" in err and "--modules" in err


def test_golden_weights_changed_since_recording_is_one_line_exit_2(tmp_path, capsys,
                                                                   tiny_checkpoints):
    import shutil

    from parity.cli import main
    from parity.recording import Recording, checkpoint_sha256

    weights = tmp_path / "weights.safetensors"
    shutil.copyfile(tiny_checkpoints["sgm"], weights)
    rec = Recording.load(GOLDEN)
    rec.spec.checkpoint = str(weights)
    rec.meta.pop("checkpoint_generator_version", None)
    rec.meta["checkpoint_sha256"] = checkpoint_sha256(tiny_checkpoints["diffusers"])
    golden = rec.save(tmp_path / "golden")
    code = main(["check", "--golden", str(golden), "--out", str(tmp_path / "out"), "--locate",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "which has changed since (content sha256 differs)" in err


# ---- a port that raises while it is localised ---------------------------------------------------

def test_a_port_raising_under_locate_is_named_with_a_one_line_headline(tmp_path, capsys):
    code, stdout, _, report = _check(tmp_path / "out", capsys, "--quiet", "--locate",
                                     "--port", f"{ADAPTERS}:raising_cross_attention")
    assert code == 1
    headline = stdout.splitlines()[0]
    assert headline.startswith("ERROR at stage 'unet', step 0, module "
                               "'input_blocks.4.1.transformer_blocks.0.attn2' "), headline
    assert " raised ValueError: " in headline and "C++" not in headline
    culprit = report["first_divergent_module"]
    assert culprit["module"] == "input_blocks.4.1.transformer_blocks.0.attn2"
    loc = report["localisation"][0]
    assert loc["free_run_error"].startswith("ValueError")
    row = next(r for r in loc["modules"] if r["module"] == culprit["module"])
    assert len(row["error_text"]) > len(row["error"])  # the whole text is in report.json
    assert report["stages"]["unet"]["verdict"] == "error"


# ---- the port's sampler: what it passes to the UNet ---------------------------------------------

@pytest.mark.parametrize("factory, tensor", [("no_input_scaling", "euler/x_in"),
                                             ("sigma_as_timestep", "euler/timestep"),
                                             ("timestep_off_by_one", "euler/timestep")])
def test_a_port_sampler_bug_fails_at_sampler_naming_the_argument(tmp_path, capsys, factory,
                                                                  tensor):
    code, stdout, _, report = _check(tmp_path / "out", capsys, "--quiet",
                                     "--stages", "sampler", "--port", f"{ADAPTERS}:{factory}")
    assert code == 1
    assert stdout.startswith(f"FAIL at stage 'sampler', step 0, tensor '{tensor}': rel_l2 ")
    latents = [t for t in report["stages"]["sampler"]["tensors"]
               if t["name"] == "euler/latents"]
    assert latents and all(t["verdict"] == "pass" for t in latents)  # only the input is wrong


# ---- capabilities are declared, never guessed ---------------------------------------------------

def test_module_access_is_declared_by_the_contract_not_guessed_from_attributes(tiny_checkpoints):
    import sys

    from parity.contract import CellContract
    from parity.port_cells import PortCells, has_cells
    from parity.ports import import_file
    from sdxl_ms import load_pipeline

    pipe = load_pipeline(tiny_checkpoints["sgm"])
    assert isinstance(pipe, CellContract)
    cells = PortCells(pipe)
    path = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    assert cells.module(path) is pipe.model.unet.input_blocks[1][0].in_layers[2]
    assert [prefix for prefix, _ in cells.roots("conditioner")] == [
        "conditioner.embedders.0", "conditioner.embedders.1"]
    adapters = import_file(Path(ADAPTERS))
    assert sys.modules[adapters.__name__] is adapters  # registered: graph code resolves globals
    networks_only = adapters.networks_only(tiny_checkpoints["sgm"], "float32")
    assert hasattr(networks_only, "pipe") and not has_cells(networks_only)

    class HoldsAModel:  # the README adapter's shape: `self.model` is not a capability
        model = pipe
    assert not has_cells(HoldsAModel())


# ---- `sdxl-parity locate --port` ----------------------------------------------------------------

def test_locate_takes_a_port_and_refuses_one_without_modules(tmp_path, capsys):
    from parity.cli import main

    golden = REPO_ROOT / "fixtures" / "golden" / "tiny-locate"
    code = main(["locate", "--golden", str(golden), "--out", str(tmp_path / "a"), "--quiet",
                 "--stage", "decode", "--port", f"{ADAPTERS}:networks_only"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "NetworksPort offers no cells()" in err
    code = main(["locate", "--golden", str(golden), "--out", str(tmp_path / "b"), "--quiet",
                 "--stage", "decode", "--port", "sdxl_ms.pipeline:load_pipeline"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("PASS: no module over its bound (modules compared: decode ")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["meta"]["port"] == "sdxl_ms.pipeline:load_pipeline"
