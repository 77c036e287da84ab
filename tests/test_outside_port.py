"""A second MindSpore SDXL, written outside the built-in port (tests/outside_port/: stock
mindspore.nn Cells, its own loader and sampler), checked by the harness through `--port`: the
faithful one passes every stage of the tiny golden from a MindSpore `.ckpt`, and its parameter
names are the checkpoint's, with MindSpore's gamma/beta/embedding_table spellings mapped."""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"
PACKAGE = REPO_ROOT / "tests" / "outside_port"
PORT = PACKAGE / "port.py"


@pytest.fixture(scope="module")
def ms_ckpt(tmp_path_factory):
    """The seeded tiny checkpoint in MindSpore's format (what `sdxl-parity make-checkpoint
    --preset tiny --seed 0 --format mindspore` writes)."""
    from sdxl_ms.config import TINY
    from sdxl_ms.weights.synthetic import make_checkpoint

    return make_checkpoint(TINY, 0, tmp_path_factory.mktemp("outside") / "tiny.ckpt", "mindspore")


def test_the_port_imports_nothing_of_the_builtin_port_but_the_tokenizer():
    forbidden = ("sdxl_ms.models", "sdxl_ms.nn", "sdxl_ms.pipeline", "sdxl_ms.sampling")
    found = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, n) for n in names if n.startswith("sdxl_ms")]
    assert found and all(n == "sdxl_ms.tokenizer" for _, n in found), found
    assert not [f for f in found if f[1].startswith(forbidden)]


def test_parameter_names_are_the_checkpoints(ms_ckpt):
    import mindspore as ms

    from outside_port.checkpoint import checkpoint_name
    from outside_port.port import SDXL

    names = [n for n, _ in SDXL().parameters_and_names()]
    in_file = set(ms.load_checkpoint(str(ms_ckpt)))
    mapped = {checkpoint_name(n) for n in names}
    assert len(mapped) == len(names)
    assert sorted(mapped - in_file) == [] and sorted(in_file - mapped) == []
    # the names the brief pins, as the port spells them
    for name in ("model.diffusion_model.input_blocks.1.0.in_layers.0.gamma",
                 "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn"
                 ".q_proj.weight",
                 "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding"
                 ".embedding_table",
                 "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                 "first_stage_model.decoder.mid.attn_1.q.weight"):
        assert name in names


def test_cells_name_the_modules_that_compute(ms_ckpt):
    import mindspore as ms

    from outside_port.port import make

    port = make(ms_ckpt, "float16")
    names = {n for n, _ in port.root.parameters_and_names()}
    cells = port.cells()
    assert list(cells) == ["conditioner", "unet", "decode"]
    assert [p for p, _ in cells["conditioner"]] == ["conditioner.embedders.0",
                                                    "conditioner.embedders.1"]
    covered = set()
    for stage, pairs in cells.items():
        for path, cell in pairs:
            params = dict(cell.parameters_and_names())
            covered |= {f"{path}.{n}" for n in params}
            want = ms.float32 if stage == "decode" else ms.float16  # the VAE decodes in float32
            assert {p.dtype for p in params.values()} == {want}, (path, stage)
    assert covered == names
    assert not hasattr(port, "modules")  # the harness's own, different contract method


def test_a_checkpoint_that_does_not_fit_fails_loudly(ms_ckpt, tmp_path):
    import mindspore as ms

    from outside_port.checkpoint import CheckpointMismatch
    from outside_port.port import make

    raw = ms.load_checkpoint(str(ms_ckpt))
    raw.pop("first_stage_model.decoder.mid.attn_1.q.bias")
    raw["conditioner.embedders.1.model.extra"] = ms.Parameter(ms.Tensor(np.zeros(2, np.float32)))
    broken = tmp_path / "broken.ckpt"
    ms.save_checkpoint([{"name": k, "data": v} for k, v in raw.items()], str(broken))
    with pytest.raises(CheckpointMismatch,
                       match=r"1 missing \(first_stage_model\.decoder\.mid\.attn_1\.q\.bias\), "
                             r"1 unexpected \(conditioner\.embedders\.1\.model\.extra\)"):
        make(broken, "float32")
    with pytest.raises(CheckpointMismatch, match="MindSpore .ckpt files only"):
        make(tmp_path / "tiny.safetensors", "float32")


def test_the_faithful_port_passes_every_stage(ms_ckpt, tmp_path, capsys):
    from parity.cli import main

    out = tmp_path / "report"
    code = main(["check", "--golden", str(GOLDEN), "--checkpoint", str(ms_ckpt),
                 "--port", f"{PORT}:make", "--out", str(out), "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert stdout.startswith("PASS: 7/7 stages"), stdout
    port = json.loads((out / "report.json").read_text())["meta"]["port"]
    assert port["class"] == "outside_port.port.OutsidePort"
    assert port["sampler"] == "own sample()" and port["guide"] == "own guide()"
