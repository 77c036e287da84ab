"""The pytest plugin as a porting team uses it: a repo of its own made in a temp folder (an
adapter module, a golden, a waiver file, no conftest), `pytest --sdxl-golden ...` run in it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_waivers import readme_waivers

TEAM_ADAPTER = '''"""The team's adapter: its port's networks, and one with a UNet bug."""
import numpy as np

from adapters import NetworksPort, float16_decoder_attention  # the team's MindSpore SDXL


class TeamPort(NetworksPort):
    version = "team-port 0.1"


class ScaledEps(TeamPort):
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        eps = super().unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        return eps * np.float32(1.01)


make = TeamPort
broken = ScaledEps
fp16_attention = float16_decoder_attention
'''


@pytest.fixture(scope="module")
def team_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("team-repo")
    (repo / "team_adapter.py").write_text(TEAM_ADAPTER)
    shutil.copytree(REPO_ROOT / "fixtures" / "golden" / "tiny-default", repo / "golden")
    (repo / "waivers.toml").write_text(readme_waivers())
    return repo


def _pytest(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests")}  # where `adapters` lives
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--sdxl-golden", "golden", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_broken_adapter_gives_per_tensor_failures_selected_by_k_and_in_junit(team_repo):
    assert not (team_repo / "conftest.py").exists()
    run = _pytest(team_repo, "--sdxl-port", "team_adapter:broken", "-k", "unet",
                  "--junitxml", "junit.xml", "-rf")
    assert run.returncode == 1, run.stdout + run.stderr
    counts = re.search(r"(\d+) failed, (\d+) deselected", run.stdout)
    assert counts, run.stdout
    assert int(counts[1]) == 24  # 2 samplers x 4 calls x (uncond, cond, guided)
    failed = re.findall(r"^FAILED sdxl-parity::(\S+)", run.stdout, re.M)
    assert failed and all(name.startswith("unet[") for name in failed)
    assert "unet[euler-step0-eps_guided]" in failed
    paragraph = re.search(r"_+ unet\[euler-step0-eps_guided\] _+\n(.*)\n", run.stdout)[1]
    assert paragraph.startswith("stage 'unet', step 0, tensor 'euler/eps_guided': rel_l2 ")
    assert "> fail 1e-05" in paragraph and "Policy bounds: rel_l2 fail 1.00e-05" in paragraph
    cases = ET.parse(team_repo / "junit.xml").getroot().iter("testcase")
    messages = {c.get("name"): c.find("failure").get("message") for c in cases}
    assert len(messages) == 24 and all(m.startswith("stage 'unet', step ") for m in
                                       messages.values())
    assert "FAIL at stage 'unet', step 0, tensor 'euler/eps_uncond'" in run.stdout  # summary


def test_the_readme_waiver_example_passes_with_one_waived_item(team_repo):
    run = _pytest(team_repo, "--sdxl-port", "team_adapter:fp16_attention",
                  "--sdxl-waivers", "waivers.toml", "--sdxl-report", "report", "-rx")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b74 passed, 1 xfailed\b", run.stdout), run.stdout
    assert re.search(r"XFAIL sdxl-parity::decode\[probe-decoded\] - waived by waiver "
                     r"'fp16-decoder-attention'", run.stdout), run.stdout
    assert (team_repo / "report" / "index.html").is_file()
    assert (team_repo / "report" / "report.json").read_text().count('"verdict": "waived"') >= 1


def test_items_spread_over_xdist_workers(team_repo):
    run = _pytest(team_repo, "--sdxl-port", "team_adapter:make", "-n", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b75 passed\b", run.stdout), run.stdout
    assert "2 workers" in run.stdout
