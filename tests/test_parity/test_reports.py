"""parity.results and parity.reports on synthetic stage results (no model needed)."""
import csv
import dataclasses
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from sdxl_common import atomic
from parity.metrics import MSPROBE_COLUMNS, compare, compare_exact, image_metrics
from parity.policy import load_policy
from parity.reports import (json_report, line_chart_svg, read_json, render_from_json,
                            write_csv, write_image_triplet, write_reports)
from parity.results import STAGES, ParityReport, StageResult, Verdict

DT = "float32"


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def _tensor(policy, stage, name, rel, step=None, size=64, seed=0):
    """A judged float comparison whose rel_l2 is about `rel`."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(size)
    d = rng.standard_normal(size)
    port = ref + d * (rel * np.linalg.norm(ref) / np.linalg.norm(d))
    return policy.tensor_result(stage, DT, name, compare(ref, port, **policy.tolerances(stage, DT)),
                                step=step)


def _passing_stages(policy):
    ids = np.arange(10)
    img = np.full((16, 16, 3), 120, np.uint8)
    out = {
        "tokens": [policy.tensor_result("tokens", DT, "input_ids", compare_exact(ids, ids))],
        "image": [policy.tensor_result("image", DT, "prompt0", image_metrics(img, img))],
    }
    for stage in ("conditioner", "decode"):
        out[stage] = [_tensor(policy, stage, "out", 1e-7)]
    for stage in ("unet", "sampler", "trajectory"):
        out[stage] = [_tensor(policy, stage, "x", 1e-7, step=i, seed=i) for i in range(3)]
    return {k: policy.stage_result(k, DT, v) for k, v in out.items()}


def _report(stages, **meta):
    return ParityReport.build(stages.values(), meta={"policy": "default", "dtype": DT, **meta})


def _failing_report(policy):
    stages = _passing_stages(policy)
    unet = [
        _tensor(policy, "unet", "eps_cond", 1e-7, step=0),
        _tensor(policy, "unet", "eps_cond", 3e-6, step=1),   # warn
        _tensor(policy, "unet", "eps_cond", 5e-3, step=3),   # fail, recorded first
        _tensor(policy, "unet", "eps_uncond", 1e-7, step=2),
        _tensor(policy, "unet", "eps_cond", 3.1e-3, step=2),  # earliest failing step
    ]
    stages["unet"] = policy.stage_result("unet", DT, unet)
    stages["decode"] = policy.stage_result("decode", DT, [_tensor(policy, "decode", "x", 1.0)])
    return _report(stages)


def test_pass_headline_and_order(policy):
    report = _report(_passing_stages(policy))
    assert list(report.stages) == list(STAGES)
    assert report.verdict == Verdict.PASS and report.ok
    assert report.headline() == "PASS: 7/7 stages within policy 'default' (float32)"


def test_headline_names_first_failing_stage_and_earliest_step(policy):
    report = _failing_report(policy)
    assert report.verdict == Verdict.FAIL and not report.ok
    assert report.stages["unet"].first_failure == ("eps_cond", 2)
    assert report.headline() == ("FAIL at stage 'unet', step 2, tensor 'eps_cond': "
                                 "rel_l2 3.10e-03 > fail 1e-05")


def test_headline_without_step_and_from_notes(policy):
    stages = _passing_stages(policy)
    stages["conditioner"] = policy.stage_result(
        "conditioner", DT, [_tensor(policy, "conditioner", "crossattn", 2e-5)])
    assert _report(stages).headline() == ("FAIL at stage 'conditioner', tensor 'crossattn': "
                                          "rel_l2 2.00e-05 > fail 1e-05")
    stages["tokens"] = StageResult.build("tokens", [], verdict=Verdict.FAIL,
                                         notes=["runner raised KeyError('bos')"])
    assert _report(stages).headline() == "FAIL at stage 'tokens': runner raised KeyError('bos')"


def test_warn_and_skip_headlines(policy):
    stages = _passing_stages(policy)
    stages["trajectory"] = policy.stage_result(
        "trajectory", DT, [_tensor(policy, "trajectory", "latents", 5e-5, step=4)])
    stages["sampler"] = StageResult.skipped("sampler", "replay disabled")
    headline = _report(stages).headline()
    assert headline.startswith("WARN: 6/6 stages within the fail bounds of policy 'default' "
                               "(float32), 5 within warn bounds; first warning at stage "
                               "'trajectory', step 4, tensor 'latents': rel_l2 5.00e-05 > warn")
    assert headline.endswith("; not run: sampler")
    empty = ParityReport.build([StageResult.skipped("unet", "x")], meta={"policy": "p"})
    assert empty.verdict == Verdict.SKIP and not empty.ok
    assert empty.headline().startswith("SKIP: no stage was compared")


def test_round_trip_to_dict_and_json(policy, tmp_path):
    report = _failing_report(policy)
    report.meta.update(seeds=[0, 1], prompts=["a cat"], config={"preset": "tiny"})
    d = report.to_dict()
    assert d["verdict"] == "fail" and d["stages"]["unet"]["verdict"] == "fail"
    assert d["headline"] == report.headline()
    back = ParityReport.from_dict(json.loads(json.dumps(d)))
    # eps_uncond has no steps 0-1: its per-step series holds NaN there, and NaN != NaN, so
    # compare the JSON-safe forms (NaN -> "nan") as well as the objects minus that series.
    assert back.to_dict() == d
    assert d["stages"]["unet"]["per_step"]["eps_uncond.rel_l2"][:2] == ["nan", "nan"]
    back.stages["unet"].per_step = report.stages["unet"].per_step
    assert back == report
    write_reports(report, tmp_path)
    assert read_json(tmp_path / "report.json").to_dict() == d
    clean = _report(_passing_stages(policy))
    assert ParityReport.from_dict(json.loads(json.dumps(clean.to_dict()))) == clean
    with pytest.raises(ValueError, match="schema_version"):
        ParityReport.from_dict(dict(d, schema_version=99))


def test_json_file_is_strict_and_has_documented_fields(policy, tmp_path):
    report = _report(_passing_stages(policy))
    write_reports(report, tmp_path)
    text = (tmp_path / "report.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    d = json.loads(text)
    unet = d["stages"]["unet"]
    assert unet["verdict"] == "pass"
    assert set(unet["per_step"]) == {"x.rel_l2"} and len(unet["per_step"]["x.rel_l2"]) == 3
    assert unet["tensors"][0]["metrics"]["kind"] == "tensor"
    assert d["stages"]["image"]["tensors"][0]["metrics"]["psnr_db"] == "inf"


def test_files_written_md_html_csv_junit(policy, tmp_path):
    stages = _passing_stages(policy)
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    port = ref.copy()
    port[4, 4] ^= 1
    images = write_image_triplet(ref, port, tmp_path, "prompt0")
    assert images == {"ref": "images/prompt0_ref.png", "port": "images/prompt0_port.png",
                      "diff": "images/prompt0_diff.png"}
    stages["image"] = policy.stage_result(
        "image", DT, [policy.tensor_result("image", DT, "prompt0", image_metrics(ref, port))],
        images=images)
    report = _report(stages)
    paths = write_reports(report, tmp_path, junit_xml=tmp_path / "junit.xml")
    assert set(paths) == {"json", "md", "html", "csv", "junit"}

    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[0] == report.headline()
    assert "| stage | verdict | worst metric | first failure |" in md
    assert "![ref](images/prompt0_ref.png)" in md

    page = (tmp_path / "index.html").read_text()
    assert report.headline() in page
    assert page.count("data:image/png;base64,") == 3
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert svgs, "no per-step plot"
    for svg in svgs:
        ET.fromstring(svg)  # well-formed

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(s.tensors) for s in report.stages.values())
    assert set(MSPROBE_COLUMNS) <= set(rows[0])
    cond = next(r for r in rows if r["stage"] == "conditioner")
    assert float(cond["Cosine"]) == report.stages["conditioner"].tensors[0].metrics.cosine
    assert float(cond["rel_l2"]) == pytest.approx(1e-7, rel=1e-6)


def test_junit_has_one_failure_for_the_failing_stage(policy, tmp_path):
    stages = _passing_stages(policy)
    stages["unet"] = policy.stage_result("unet", DT, [_tensor(policy, "unet", "eps", 1e-3, 2)])
    stages["sampler"] = StageResult.skipped("sampler", "replay disabled")
    write_reports(_report(stages), tmp_path, junit_xml=tmp_path / "ci" / "junit.xml")
    root = ET.parse(tmp_path / "ci" / "junit.xml").getroot()
    suites = root.findall("testsuite")
    assert len(suites) == 1
    cases = suites[0].findall("testcase")
    assert [c.get("name") for c in cases] == list(STAGES)
    failures = [(c.get("name"), f) for c in cases for f in c.findall("failure")]
    assert len(failures) == 1 and failures[0][0] == "unet"
    assert "rel_l2 1.00e-03 > fail 1e-05" in failures[0][1].get("message")
    assert suites[0].get("failures") == "1" and suites[0].get("skipped") == "1"
    assert cases[STAGES.index("sampler")].find("skipped") is not None


def test_json_write_is_atomic(policy, tmp_path, monkeypatch):
    class Broken(json.JSONEncoder):
        def iterencode(self, o, _one_shot=False):
            yield '{"schema_version": 1, "verd'
            raise RuntimeError("disk on fire")

    report = _report(_passing_stages(policy))
    monkeypatch.setattr(json_report, "JSONEncoder", Broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_reports(report, tmp_path)
    assert not (tmp_path / "report.json").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind

    monkeypatch.undo()
    write_reports(report, tmp_path)
    good = (tmp_path / "report.json").read_text()
    monkeypatch.setattr(json_report, "JSONEncoder", Broken)
    with pytest.raises(RuntimeError):
        write_reports(report, tmp_path)
    assert (tmp_path / "report.json").read_text() == good  # old report intact
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "f.txt"
    atomic.atomic_write_text(target, "old")
    with pytest.raises(ValueError):
        with atomic.atomic_open(target) as f:
            f.write("half")
            raise ValueError
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_render_from_json_elsewhere(policy, tmp_path):
    src, dst = tmp_path / "run", tmp_path / "rendered"
    ref = np.zeros((8, 8, 3), np.uint8)
    images = write_image_triplet(ref, ref + 1, src, "p")
    stages = _passing_stages(policy)
    stages["image"] = dataclasses.replace(stages["image"], images=images)
    report = _report(stages)
    write_reports(report, src)
    paths = render_from_json(src / "report.json", dst)
    assert set(paths) == {"md", "html"}
    md = (dst / "report.md").read_text()
    assert md.splitlines()[0] == report.headline()
    assert "![diff](../run/images/p_diff.png)" in md
    assert (dst / "index.html").read_text().count("data:image/png;base64,") == 3
    # default out_dir: next to the json
    (src / "report.md").unlink()
    (src / "index.html").unlink()
    render_from_json(src / "report.json")
    assert (src / "report.md").read_text().splitlines()[0] == report.headline()
    assert "![diff](images/p_diff.png)" in (src / "report.md").read_text()
    assert (src / "index.html").exists()


def test_derived_per_step_and_worst_metric(policy):
    tensors = [_tensor(policy, "trajectory", "latents", r, step=s)
               for s, r in ((0, 1e-7), (2, 4e-6), (1, 2e-6))]
    stage = policy.stage_result("trajectory", DT, tensors)
    series = stage.per_step["latents.rel_l2"]
    assert [round(v / 1e-7) for v in series] == [1, 20, 40]
    assert stage.worst_metric() == "rel_l2 4.00e-06 (latents, step 2)"


def test_line_chart_svg_log_axis():
    a = [1e-7, 2e-7, 0.0, 1e-5, 2e-5, float("nan"), 1e-3]
    svg = line_chart_svg({"a": a, "b": [2e-6, 3e-6]},
                         title="t", y_label="rel_l2", hlines={"fail 1e-05": 1e-5})
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"1e-7", "1e-5", "1e-3"} <= set(texts)  # decade ticks
    assert "fail 1e-05" in texts and "rel_l2 (log)" in texts
    assert any(t and "zero value" in t for t in texts)
    # a is broken by the zero and the NaN: 2 lines and a lone point; b: 1 line
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 3
    empty = line_chart_svg({"a": [0.0, 0.0]})
    assert "no positive finite values" in empty


def test_write_csv_standalone(policy, tmp_path):
    report = _failing_report(policy)
    path = write_csv(report, tmp_path / "sub" / "m.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = next(r for r in rows if r["stage"] == "tokens")
    assert tokens["kind"] == "exact" and tokens["mismatches"] == "0" and tokens["Cosine"] == ""
    failing = next(r for r in rows if r["tensor"] == "eps_cond" and r["step"] == "2")
    m = report.stages["unet"].find("eps_cond", 2).metrics
    assert float(failing["rel_l2"]) == m.rel_l2  # full precision
    assert float(failing["One Thousandth Err Ratio"]) == m.ratio_rel_err_le_1e3
    assert failing["verdict"] == "fail" and failing["reasons"].startswith("rel_l2 3.10e-03")
