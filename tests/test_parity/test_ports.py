"""The typed stage contract: both sides conform to it, and any port plugs in through
`--port MODULE:FACTORY`, its own sampler loop included (adapters in tests/adapters.py)."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from conftest import REPO_ROOT
from contract_conformance import ContractConformance, SamplingConformance
from parity.contract import SamplingContract, output_problems, signature_problems

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"
ADAPTERS = str(REPO_ROOT / "tests" / "adapters.py")


@pytest.fixture(scope="module")
def sides(tiny_checkpoints):
    from parity.reference import load_reference
    from sdxl_ms import load_pipeline

    return {"port": load_pipeline(tiny_checkpoints["sgm"]),
            "reference": load_reference(tiny_checkpoints["diffusers"])}


class TestBuiltinPortConforms(ContractConformance, SamplingConformance):
    @pytest.fixture
    def port(self, sides):
        return sides["port"]


class TestReferenceConforms(ContractConformance):
    @pytest.fixture
    def port(self, sides):
        return sides["reference"]


def test_the_builtin_port_offers_its_own_sampler(sides):
    assert isinstance(sides["port"], SamplingContract)
    params = inspect.signature(sides["port"].sample).parameters
    assert list(params) == ["run", "eps", "callback"]


def test_a_broken_port_is_named(sides):
    class Wrong:
        def tokenize(self, prompts):
            return {"input_ids": np.zeros((2, 77), np.int32)}

        def encode_prompt(self, prompt, negative_prompt=None, *, original_size,
                          crops_coords_top_left, target_size):
            return {}

        def unet(self, x, t, context, pooled, ids):
            return x

    problems = signature_problems(Wrong())
    assert "no method decode()" in problems
    assert ("unet() lacks argument(s) sample, timestep, encoder_hidden_states, text_embeds, "
            "time_ids") in problems
    assert output_problems(Wrong())[0].startswith("tokenize()['input_ids']: want int64 (2, 77)")


def _check(tmp_path, port, capsys, *extra):
    from parity.cli import main

    code = main(["check", "--golden", str(GOLDEN), "--out", str(tmp_path / "r"), "--quiet",
                 "--port", port, *extra])
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "r" / "report.json").read_text()) if code in (0, 1) else None
    return code, out, err, report


def test_faithful_adapter_with_its_own_sampler_passes(tmp_path, capsys):
    code, out, _, report = _check(tmp_path, f"{ADAPTERS}:faithful", capsys)
    assert code == 0, out
    assert out.startswith("PASS: 7/7 stages")
    port = report["meta"]["port"]
    assert port["spec"] == f"{ADAPTERS}:faithful"
    assert port["class"].endswith("OwnLoopPort") and port["version"] == "adapter-1.0"
    assert port["sampler"] == "own sample()"
    sampler = report["stages"]["sampler"]
    worst = max(t["metrics"]["rel_l2"] for t in sampler["tensors"])
    assert 0 < worst < 1e-5  # its own loop, not a copy of the built-in one's numbers
    assert not any("built-in" in n for n in sampler["notes"])


@pytest.mark.parametrize("factory, stage", [("sd1_scale_decode", "decode"),
                                            ("half_step_sampler", "sampler")])
def test_broken_adapter_fails_at_its_stage(tmp_path, capsys, factory, stage):
    code, out, _, report = _check(tmp_path, f"{ADAPTERS}:{factory}", capsys)
    assert code == 1
    assert out.startswith(f"FAIL at stage '{stage}'")
    stages = list(report["stages"])
    earlier = stages[:stages.index(stage)]
    assert all(report["stages"][s]["verdict"] == "pass" for s in earlier), earlier


def test_port_without_sampler_uses_the_builtin_one_and_says_so(tmp_path, capsys):
    code, out, _, report = _check(tmp_path, f"{ADAPTERS}:networks_only", capsys,
                                  "--stages", "unet,sampler")
    assert code == 0, out
    assert report["meta"]["port"]["sampler"].startswith("built-in")
    assert ("the port offers no sample(): the built-in sdxl_ms sampler was used"
            in report["stages"]["sampler"]["notes"])
    assert ("the port offers no guide(): eps_guided uses the reference's CFG"
            in report["stages"]["unet"]["notes"])


@pytest.mark.parametrize("port, message", [
    (f"{ADAPTERS}:missing_decode", "does not implement the stage contract: no method decode()"),
    ("no_colon_here", "write MODULE:FACTORY"),
    (f"{ADAPTERS}:nothing", "has no callable 'nothing'"),
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
])
def test_bad_port_is_one_line_exit_2(tmp_path, capsys, port, message):
    code, _, err, _ = _check(tmp_path, port, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
