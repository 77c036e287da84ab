"""`sdxl-parity sweep`: the sweep file read strictly, the matrix and its ids, and small sweeps
run for real on the local process pool and on a local Ray cluster: a pass that a rerun skips
whole, a port broken for some cases only, and a worker killed mid-sweep."""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from parity.cli import main
from parity.sweep.sweep_file import load_sweep, parse_sweep
from sdxl_common.errors import InputError

from conftest import REPO_ROOT

PORTS = REPO_ROOT / "tests" / "sweep_ports.py"
PROMPT = "a lighthouse on a rocky coast at dusk"

# euler only, 3 cases: seeds 0 and 1 without a negative prompt, seed 0 with one
SMALL = f"""
preset = "tiny"
prompts = ["{PROMPT}"]
negative_prompts = ["", "blurry"]
seeds = [0, 1]
samplers = ["euler"]
steps = [2]
sizes = ["64x64"]

[[exclude]]
seed = 1
negative_prompt = "blurry"
"""

# euler and euler_a, one case each, checked with a port whose ancestral steps are broken
MUTANT = f"""
prompts = ["{PROMPT}"]
samplers = ["euler", "euler_a"]
steps = [2]
sizes = [[64, 64]]
port = "{PORTS}:broken_ancestral"
"""


def _sweep(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _main(capsys, *argv):
    code = main(["sweep", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _cases(out: Path):
    return json.loads((out / "sweep.json").read_text())["cases"]


# ---- the sweep file: strict, one line, exit 2, nothing written -------------------------------

@pytest.mark.parametrize("text, message", [
    ('samplers = ["euler"]\nsampler = ["euler_a"]\n',
     "sampler: unknown key (did you mean 'samplers'?)"),
    ("seeds = []\n", "seeds: empty list"),
    ('samplers = ["euler", "eulr"]\n', "samplers: \"eulr\": unknown sampler 'eulr'"),
    ('schedules = ["sgm"]\n', "schedules: \"sgm\": the sgm schedule has no diffusers"),
    ("steps = 2\n", "steps: want a list of integers, got an integer (write steps = [2])"),
    ('seeds = [0, "1"]\n', "seeds: \"1\": want integers"),
    ('sizes = ["64x60"]\n', "sizes: \"64x60\": width must be a positive multiple of 8"),
    ("guidance = [1.0]\n", "guidance: 1.0: guidance must be > 1"),
    ('samplers = ["euler"]\n[[exclude]]\nsamplers = "euler"\n',
     "exclude[0].samplers: unknown key (did you mean 'sampler'?)"),
    ('samplers = ["euler"]\n[[exclude]]\nsampler = "euler_a"\n',
     'exclude[0].sampler: "euler_a" is not in samplers: the exclude would match nothing'),
    ('samplers = ["euler"]\n[[exclude]]\nsampler = "euler"\n',
     "exclude: excludes the only case of the matrix; nothing to run"),
    ('samplers = ["euler_a"]\nschedules = ["karras"]\n',
     "euler_a cannot be compared with the karras schedule"),
    ('port = "no_such_module_xyz:make"\n', "port: cannot import 'no_such_module_xyz'"),
    ("[resources.record]\nnum_gpu = 1\n", "resources.record.num_gpu: unknown key"),
    ('prompts = ["a"\n', "invalid TOML"),
])
def test_a_bad_sweep_file_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = _sweep(tmp_path, text)
    code, out, err = _main(capsys, path, "--out", tmp_path / "out", "--quiet")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sdxl-parity: error: sweep file {path}: "), err
    assert message in err, err
    assert out == "" and not (tmp_path / "out").exists()


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, _, err = _main(capsys, _sweep(tmp_path, SMALL), "--executor", "ray", "--out",
                         tmp_path / "out")
    assert code == 2
    assert err.strip() == ("sdxl-parity: error: --executor ray needs ray, and they are not "
                           "installed: pip install 'sdxl-parity[ray]'")


def test_without_torch_a_sweep_is_one_line_naming_the_reference_extra(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    code, _, err = _main(capsys, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sdxl-parity sweep" in err and "pip install 'sdxl-parity[reference]'" in err
    assert not (tmp_path / "out").exists()


# ---- the matrix and its ids -----------------------------------------------------------------

def _parse(text: str, tmp_path: Path):
    import tomllib

    return parse_sweep(tomllib.loads(text), "t.toml", tmp_path)


def test_the_matrix_is_the_product_less_the_excludes(tmp_path):
    text = ('prompts = ["a", "b"]\nseeds = [0, 1, 2]\nsamplers = ["euler", "euler_a"]\n'
            'schedules = ["leading", "trailing"]\nsteps = [2]\nguidance = [5, 7.5]\n')
    full = _parse(text, tmp_path)
    assert len(full.cases) == 2 * 3 * 2 * 2 * 2 and full.excluded == 0
    assert full.varying() == ["prompt", "seed", "sampler", "schedule", "guidance"]
    cut = _parse(text + '[[exclude]]\nsampler = "euler_a"\nschedule = "trailing"\n'
                        '[[exclude]]\nseed = [1, 2]\nprompt = "b"\n', tmp_path)
    assert cut.excluded == 12 + 16 - 4 and len(cut.cases) == 48 - cut.excluded
    assert not any(c.sampler == "euler_a" and c.run.schedule == "trailing" for c in cut.cases)
    assert not any(c.run.seed in (1, 2) and c.run.prompt == "b" for c in cut.cases)
    assert all(c.run.samplers in (("euler",), ("euler_a",)) for c in cut.cases)


def test_case_ids_are_deterministic_readable_and_distinct(tmp_path):
    text = 'samplers = ["euler", "euler_a"]\nseeds = [3, 4]\nnegative_prompts = ["", "x"]\n'
    ids = [c.id for c in _parse(text, tmp_path).cases]
    assert ids == [c.id for c in _parse(text, tmp_path).cases]  # the same spec, the same id
    assert len(set(ids)) == len(ids) == 8
    assert ids[0].startswith("euler-leading-seed3-") and len(ids[0].rsplit("-", 1)[1]) == 12
    assert next(c for c in _parse(text, tmp_path).cases if c.run.negative_prompt == "x")
    # anything that changes what a case computes or how it is judged changes its id
    for change in ('policy = "default"\n', "steps = [3]\n", "guidance = [6.0]\n",
                   f'port = "{PORTS}:killed_once"\n', 'stages = ["unet"]\n', "truth = true\n"):
        other = [c.id for c in _parse(text + change, tmp_path).cases]
        if change.startswith("policy"):  # the default policy, named: the same cases
            assert other == ids
        else:
            assert not set(other) & set(ids), change


def test_the_example_sweep_ships_with_the_package():
    sweep = load_sweep()
    cases = sweep.cases
    assert sweep.source.endswith("parity/sweeps/example.toml")
    assert len(cases) >= 12 and sweep.excluded > 0
    assert {c.sampler for c in cases} == {"euler", "euler_a"}
    assert len({c.run.schedule for c in cases}) == 2 and len({c.run.seed for c in cases}) == 2
    assert len({c.run.prompt for c in cases}) == 2
    assert any(c.run.negative_prompt for c in cases) and any(
        not c.run.negative_prompt for c in cases)
    assert {c.run.steps for c in cases} == {2} and {c.run.preset for c in cases} == {"tiny"}


def test_a_sweep_file_error_names_its_key_through_the_api(tmp_path):
    with pytest.raises(InputError, match=r"^sweep file t.toml: dtypes: \"float8\": unknown"):
        _parse('dtypes = ["float8"]\n', tmp_path)


# ---- small sweeps, run for real ----------------------------------------------------------------

def _captured(*argv):
    """`sdxl-parity sweep ARGV` outside a test's capsys: (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """SMALL on the local pool: (exit code, stdout, stderr, out folder, sweep file)."""
    root = tmp_path_factory.mktemp("sweep-local")
    path = _sweep(root, SMALL)
    return (*_captured(path, "--out", root / "out", "--workers", "2"), root / "out", path)


def test_local_sweep_passes_with_one_report_that_agrees(local_sweep):
    code, stdout, stderr, out, _ = local_sweep
    assert code == 0, stdout + stderr
    assert stdout.startswith("PASS: 3/3 cases\n")
    assert stderr.count("] PASS euler-leading-seed") == 3  # a progress line per case
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["ok"] and sweep["summary"]["cases"] == 3 and sweep["summary"]["pass"] == 3
    assert sweep["executor"] == "local" and sweep["excluded"] == 1
    cases = sweep["cases"]
    ids = [c["id"] for c in cases]
    assert len(set(ids)) == 3
    assert sorted((c["spec"]["seed"], c["spec"]["negative_prompt"] or "") for c in cases) == [
        (0, ""), (0, "blurry"), (1, "")]
    for case in cases:
        assert set(case) >= {"id", "spec", "verdict", "report", "seconds", "attempts"}
        assert case["verdict"] == "pass" and case["attempts"] == 1
        folder = out / "cases" / case["id"]
        assert json.loads((folder / "case.json").read_text()) == case
        assert json.loads((out / case["report"]).read_text())["verdict"] == "pass"
        assert {"index.html", "report.md", "report.json"} <= {p.name for p in folder.iterdir()}
        assert (folder / "recording" / "manifest.json").is_file()  # kept, to check again later
    html = (out / "index.html").read_text()
    for case in cases:
        assert f'<a href="cases/{case["id"]}/index.html">{case["id"]}</a>' in html
    assert html.count('<td class="pass">PASS<br><small>') == 3 * 7  # cases x stages
    assert "negative_prompt" in html and "blurry" in html  # the varying fields label the rows
    md = (out / "sweep.md").read_text()
    assert md.startswith("PASS: 3/3 cases\n") and all(i in md for i in ids)
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert [tc.get("name") for tc in suite.iter("testcase")] == ids
    assert suite.get("failures") == "0" and not list(suite.iter("failure"))


def test_a_rerun_skips_every_finished_case(local_sweep, capsys):
    _, _, _, out, path = local_sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cases/*/*") if p.is_file()}
    code, stdout, stderr = _main(capsys, path, "--out", out, "--workers", "2")
    assert code == 0 and stdout.startswith("PASS: 3/3 cases\n")
    assert "skipped 3 finished cases" in stderr and "] PASS" not in stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("cases/*/*") if p.is_file()}
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["ran"] == 0 and sweep["skipped_finished"] == 3 and len(sweep["cases"]) == 3


@pytest.fixture(scope="module")
def mutant_local(tmp_path_factory):
    """MUTANT on the local pool: (exit code, stdout, out folder)."""
    root = tmp_path_factory.mktemp("sweep-mutant")
    out = root / "out"
    code, stdout, _ = _captured(_sweep(root, MUTANT), "--out", out, "--workers", "2", "--quiet")
    return code, stdout, out


def test_a_port_broken_for_some_cases_fails_exactly_those(mutant_local):
    code, stdout, out = mutant_local
    assert code == 1, stdout
    assert stdout.startswith("FAIL: 1/2 cases failed\n")
    verdicts = {c["spec"]["samplers"][0]: c for c in _cases(out)}
    assert verdicts["euler"]["verdict"] == "pass"
    broken = verdicts["euler_a"]
    assert broken["verdict"] == "fail"
    assert broken["headline"].startswith("FAIL at stage 'sampler'")
    assert broken["stages"]["unet"]["verdict"] == "pass"  # the networks are fine
    assert broken["stages"]["sampler"]["verdict"] == "fail"
    html = (out / "index.html").read_text()
    row = next(r for r in html.split("<tr>") if f">{broken['id']}</a>" in r)
    assert '<td class="fail">FAIL</td>' in row and '<td class="fail">FAIL<br>' in row
    ok_row = next(r for r in html.split("<tr>") if f">{verdicts['euler']['id']}</a>" in r)
    assert "fail" not in ok_row
    failures = [tc.get("name") for tc in ET.parse(out / "junit.xml").getroot().iter("testcase")
                if tc.find("failure") is not None]
    assert failures == [broken["id"]]


def test_ray_gives_the_same_verdicts_as_the_local_pool(mutant_local, tmp_path, capsys):
    import ray  # noqa: F401

    _, _, local_out = mutant_local
    out = tmp_path / "out"
    code, stdout, stderr = _main(capsys, _sweep(tmp_path, MUTANT), "--executor", "ray",
                                 "--out", out, "--workers", "2")
    assert code == 1, stdout + stderr
    assert "starting a local Ray cluster" in stderr
    assert stdout.startswith("FAIL: 1/2 cases failed\n")
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["executor"] == "ray"
    assert ({c["id"]: c["verdict"] for c in sweep["cases"]}
            == {c["id"]: c["verdict"] for c in _cases(local_out)})
    assert not ray.is_initialized()  # the cluster it started is shut down


def test_a_worker_killed_mid_sweep_is_retried_and_every_case_finishes_once(
        tmp_path, capsys, monkeypatch):
    import ray  # noqa: F401 - in the test extra

    marker = tmp_path / "killed"
    monkeypatch.setenv("SDXL_PARITY_TEST_KILL_MARKER", str(marker))
    text = SMALL.replace('samplers = ["euler"]', f'samplers = ["euler"]\nport = '
                                                 f'"{PORTS}:killed_once"')
    out = tmp_path / "out"
    code, stdout, stderr = _main(capsys, _sweep(tmp_path, text), "--executor", "ray",
                                 "--out", out, "--workers", "2")
    assert code == 0, stdout + stderr
    assert stdout.startswith("PASS: 3/3 cases\n")
    killed_pid = marker.read_text().split()[0]  # a check worker did die
    cases = _cases(out)
    assert len(cases) == 3 and len({c["id"] for c in cases}) == 3
    on_disk = sorted(p.parent.name for p in out.glob("cases/*/case.json"))
    assert on_disk == sorted(c["id"] for c in cases)
    attempts = {c["id"]: c["attempts"] for c in cases}
    killed = [i for i in attempts
              if killed_pid in (out / "cases" / i / ".starts-check").read_text().split()]
    assert len(killed) == 1 and attempts[killed[0]] == 2
    assert all(a == 1 for i, a in attempts.items() if i != killed[0])
    assert all(c["verdict"] == "pass" for c in cases)
    assert (out / "cases" / killed[0] / ".starts-check").read_text().split()[0] == killed_pid
    assert os.path.exists(out / "cases" / killed[0] / "report.json")


def test_a_case_whose_worker_keeps_dying_is_an_error_after_its_retries(tmp_path, capsys):
    text = SMALL.replace("seeds = [0, 1]", "seeds = [0]").replace(
        '["", "blurry"]', '[""]').replace('samplers = ["euler"]', 'samplers = ["euler"]\n'
                                          f'port = "{PORTS}:killed_always"')
    text = text[:text.index("[[exclude]]")]
    out = tmp_path / "out"
    code, stdout, stderr = _main(capsys, _sweep(tmp_path, text), "--out", out,
                                 "--max-retries", "1", "--workers", "1")
    assert code == 1, stdout + stderr
    assert stdout.startswith("FAIL: 1/1 cases failed (1 with an error)\n")
    (case,) = _cases(out)
    assert case["verdict"] == "error" and case["attempts"] == 2 and case["report"] is None
    assert case["error"].startswith("check: the worker process died 2 times")
    assert (out / "cases" / case["id"] / ".starts-check").read_text().count("\n") == 2
    (tc,) = ET.parse(out / "junit.xml").getroot().iter("testcase")
    assert tc.find("error").get("message") == case["error"]
    assert f'<td class="error">ERROR</td>' in (out / "index.html").read_text()
