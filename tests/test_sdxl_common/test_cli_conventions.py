"""What every command line promises: exit codes like pytest's, a port that raises is a stage
`error` (exit 1) while a harness bug is exit 3, a missing reference extra is exit 2, files
people share are 0644 and never half-written, `--version`, progress bars only where wanted,
and reports that say what ran."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _blocked_torch(tool_module: str, argv) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules['torch'] = None; from {tool_module} import main; "
            f"sys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT)


# ---- exit codes ---------------------------------------------------------------------------


def test_port_raising_in_a_stage_is_verdict_error_and_exit_1(tmp_path, monkeypatch, capsys):
    from parity.cli import main
    from sdxl_ms.models.unet import UNetModel

    def broken(self, *args):
        raise RuntimeError("injected UNet failure")

    monkeypatch.setattr(UNetModel, "construct", broken)
    junit = tmp_path / "junit.xml"
    code = main(["check", "--golden", str(GOLDEN), "--out", str(tmp_path / "r"), "--quiet",
                 "--junit-xml", str(junit)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0] == ("ERROR at stage 'unet': the port raised RuntimeError: "
                                   "injected UNet failure (traceback in report.json)")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    verdicts = {n: s["verdict"] for n, s in report["stages"].items()}
    assert verdicts["tokens"] == verdicts["conditioner"] == verdicts["sampler"] == "pass"
    assert verdicts["unet"] == verdicts["trajectory"] == "error"
    unet = report["stages"]["unet"]
    assert unet["error"] == "RuntimeError: injected UNet failure"
    assert "Traceback" in unet["traceback"] and "broken" in unet["traceback"]
    assert report["verdict"] == "error"
    assert "the port raised `RuntimeError: injected UNet failure`" in (
        tmp_path / "r" / "report.md").read_text()
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("errors") == "3" and suite.get("failures") == "0"
    case = next(c for c in suite.iter("testcase") if c.get("name") == "unet")
    assert case.find("error").get("type") == "RuntimeError" and case.find("failure") is None
    assert float(case.get("time")) > 0


def test_harness_exception_is_exit_3_one_line_and_traceback_under_debug(tmp_path, monkeypatch,
                                                                        capsys):
    import parity.reports
    from parity.cli import main

    def broken_writer(report, path):
        raise RuntimeError("injected report-writer failure")

    monkeypatch.setattr(parity.reports, "write_json", broken_writer)
    argv = ["check", "--golden", str(GOLDEN), "--out", str(tmp_path / "r"), "--quiet",
            "--stages", "tokens"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdxl-parity: error: RuntimeError: injected report-writer failure (an internal "
                   "error; rerun with --debug for the traceback)"]
    assert not (tmp_path / "r" / "report.json").exists()
    assert main(argv + ["--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "broken_writer" in err


@pytest.mark.parametrize("tool,argv,extra", [
    ("parity.cli", ["run", "--quiet"], "sdxl-parity run"),
    ("parity.cli", ["record", "--out", "rec"], "sdxl-parity record"),
    ("benchmarks.runner", ["--components", "unet", "--random-weights"], "sdxl-bench"),
])
def test_missing_reference_extra_is_exit_2_naming_the_extra(tool, argv, extra, tmp_path):
    argv = [a if a != "rec" else str(tmp_path / "rec") for a in argv]
    if tool == "benchmarks.runner":
        argv += ["--out", str(tmp_path / "bench")]
    proc = _blocked_torch(tool, argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert extra in lines[0]
    assert "pip install 'sdxl-parity[reference]'" in lines[0]
    assert not any(tmp_path.iterdir())


def test_interrupt_exits_130_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import sdxl_ms.weights.synthetic as synthetic
    from parity.cli import main

    calls = {"n": 0}
    real = synthetic.random_tensor

    def interrupted(seed, name, shape):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(seed, name, shape)

    monkeypatch.setattr(synthetic, "random_tensor", interrupted)
    for fmt, out in (("sgm", tmp_path / "tiny.safetensors"), ("diffusers", tmp_path / "tiny")):
        calls["n"] = 0
        assert main(["make-checkpoint", "--format", fmt, "--out", str(out), "--quiet"]) == 130
        assert list(tmp_path.iterdir()) == [], fmt  # no checkpoint, no temporary left


# ---- files people share -------------------------------------------------------------------


def _modes(root: Path):
    paths = [root] if root.is_file() else [root, *root.rglob("*")]
    return {p: stat.S_IMODE(p.stat().st_mode) for p in paths}


def _assert_shared(root: Path):
    for path, mode in _modes(root).items():
        want = 0o755 if path.is_dir() else 0o644
        assert mode == want, f"{path} has mode {oct(mode)}, want {oct(want)}"


def test_written_files_are_0644(tmp_path, umask_022, tiny_checkpoints):
    from parity.cli import main as parity_main
    from sdxl_ms.cli import main as ms_main

    for fmt, name in (("sgm", "c.safetensors"), ("diffusers", "c-diffusers")):
        assert parity_main(["make-checkpoint", "--format", fmt, "--out", str(tmp_path / name),
                            "--quiet"]) == 0
        _assert_shared(tmp_path / name)
    run_args = ["--checkpoint", str(tiny_checkpoints["sgm"]), "--sampler", "euler",
                "--steps", "1", "--quiet"]
    assert parity_main(["record", "--out", str(tmp_path / "rec"), *run_args]) == 0
    _assert_shared(tmp_path / "rec")
    assert parity_main(["run", "--out", str(tmp_path / "report"),
                        "--junit-xml", str(tmp_path / "junit.xml"), *run_args]) == 0
    _assert_shared(tmp_path / "report")
    _assert_shared(tmp_path / "junit.xml")
    assert ms_main(["generate", "--checkpoint", str(tiny_checkpoints["sgm"]), "--steps", "1",
                    "--out", str(tmp_path / "img.png")]) == 0
    _assert_shared(tmp_path / "img.png")
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    from sdxl_common.atomic import atomic_write_text

    target = tmp_path / "shared.txt"
    target.write_text("old")
    os.chmod(target, 0o664)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o664


# ---- CLI habits ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["sdxl-ms", "sdxl-parity", "sdxl-bench"])
def test_version(script):
    import sdxl_ms

    proc = subprocess.run([Path(sys.executable).parent / script, "--version"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.strip().startswith(f"{script} {sdxl_ms.__version__} (mindspore 2.10")


def test_bench_help_lists_compare(capsys):
    from benchmarks.runner import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sdxl-bench compare BASELINE.json CURRENT.json" in out
    assert "\n  compare " in out


class _Terminal:
    """A stderr stand-in that says it is a terminal."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    from sdxl_common import progress

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    progress.set_enabled(True)
    try:
        with progress.bar(total=3, desc="loading weights") as bar:
            bar.update(3)
        assert "loading weights" in term.text
        progress.set_enabled(False)  # what --quiet does
        term.text = ""
        with progress.bar(total=3, desc="loading weights") as bar:
            bar.update(3)
        assert term.text == ""
    finally:
        progress.set_enabled(True)
    monkeypatch.setattr(sys, "stderr", type("Pipe", (_Terminal,), {"isatty": lambda s: False})())
    with progress.bar(total=3, desc="loading weights") as bar:
        assert bar.disable


def test_report_says_what_ran(tmp_path, capsys):
    from parity.cli import main

    out = tmp_path / "r"
    assert main(["check", "--golden", str(GOLDEN), "--out", str(out), "--quiet",
                 "--stages", "tokens,conditioner"]) == 0
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["command"] == ("sdxl-parity check --golden " + str(GOLDEN) + " --out " + str(out)
                               + " --quiet --stages tokens,conditioner")
    reason = meta["execution"].pop("jit_reason")  # picked for these two stages' 2 encodes
    assert reason.startswith("picked: least estimated time (measured, compile included): off ")
    assert meta["execution"] == {"device_target": "CPU", "mode": "pynative", "jit": "off",
                                 "threads": len(os.sched_getaffinity(0)),
                                 "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    assert meta["execution"]["onednn_max_cpu_isa"]  # the port's runtime caps it (or the user)
    assert meta["port"]["class"] == "sdxl_ms.pipeline.SDXLPipeline"
    assert meta["port"]["mindspore"].startswith("2.10")
    assert set(meta["reference"]) >= {"torch", "diffusers", "transformers"}
    assert set(meta["stage_seconds"]) == {"tokens", "conditioner"}
    md = (out / "report.md").read_text()
    assert "- command: `sdxl-parity check --golden" in md and '"jit": "off"' in md
