"""The benchmark tooling: FLOP counts, the result format and ratios, the writers, the regression
gate and the CLI's argument errors. No timed assertions: timings only flow through."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest

from benchmarks import charts, compare, flops, report, runner
from benchmarks.workloads import Spec
from sdxl_ms.config import SDXL_BASE, TINY


# ---- FLOP counts ---------------------------------------------------------------------------

def test_layer_flops_match_hand_counts():
    assert flops.conv2d(4, 32, 3, 8, 8, batch=2) == 294_912  # 2*2*32*8*8*4*9
    assert flops.linear(768, 3072, tokens=154) == 726_663_168  # 2*154*768*3072
    assert flops.attention(2, 77, 77, 768) == 36_427_776  # 2 matmuls * 2*2*77*77*768
    assert flops.conv_out_size(15, 3, stride=2, padding=1) == 8
    # CLIP-L layer, batch 2: q,k,v,out + fc1/fc2 (768 <-> 3072) on 154 rows, plus attention
    assert flops.text_layer(SDXL_BASE.conditioner.clip_l, 2) == 2_216_417_280
    # UNet ResBlock 64 -> 128 at 16x16, batch 2: two 3x3 convs, 1x1 skip, time-embedding proj
    assert flops.unet_resblock(64, 128, 1280, 16, 16, 2) == 235_536_384
    # transformer block, dim 64, context 96 x 77 tokens, 8x8 positions, batch 2
    assert flops.transformer_block(64, 96, 64, 77, 2) == 27_279_360


def test_flops_by_kind_split_the_component_count():
    """Each kind is the count with only its layer function counted: the kinds add up to the
    total, and a kind a component lacks is 0."""
    for cfg, size in ((TINY, 64), (SDXL_BASE, 256)):
        for component in flops.COMPONENTS:
            split = flops.flops_by_kind(cfg, component, size, size)
            assert sum(split.values()) == flops.component_flops(cfg, component, size, size)
    text = flops.flops_by_kind(SDXL_BASE, "text", 256, 256)
    assert text["conv"] == 0 and text["attention"] > 0
    assert flops.flops_by_kind(SDXL_BASE, "vae", 256, 256)["matmul"] == 0
    # every kind counts again afterwards
    assert flops.linear(768, 3072, tokens=154) == 726_663_168
    assert flops.attention(2, 77, 77, 768) == 36_427_776


def test_op_profile_kinds_and_dispatch():
    """Kernel time per op type becomes time per op kind; what the kernels leave of the call's
    wall time is dispatch; the reference's non-aten rows (its profiler's own) are not kernels."""
    from benchmarks.op_profile import by_kind, table

    port = {"wall_s": 1.0, "ops": {"MatMul": 0.3, "BatchMatMul": 0.1, "Softmax": 0.05,
                                   "Conv2D": 0.2, "GroupNorm": 0.05, "BiasAdd": 0.1}}
    ref = {"wall_s": 0.5, "ops": {"aten::addmm": 0.2, "aten::mkldnn_convolution": 0.1,
                                  "aten::_scaled_dot_product_flash_attention_for_cpu": 0.05,
                                  "aten::native_group_norm": 0.02, "aten::add": 0.03,
                                  "ProfilerStep#1": 0.4}}
    p, r = by_kind("port", port), by_kind("reference", ref)
    assert p == pytest.approx({"matmul": 0.3, "attention": 0.15, "conv": 0.2, "norm": 0.05,
                               "elementwise": 0.1, "dispatch": 0.2})
    assert r == pytest.approx({"matmul": 0.2, "attention": 0.05, "conv": 0.1, "norm": 0.02,
                               "elementwise": 0.03, "dispatch": 0.1})
    md = table("unet", port, ref, {"matmul": 6e9, "conv": 4e9, "attention": 0})
    assert "| matmul | 0.3 | 30% | 0.2 | 40% | 1.50x | 20.0 / 30.0 |" in md
    assert "port 1 s, reference 0.5 s per call (2.00x)" in md


def test_component_flops_compose():
    h = w = 64
    text, unet, vae = (flops.component_flops(TINY, c, h, w) for c in ("text", "unet", "vae"))
    assert flops.component_flops(TINY, "pipeline", h, w, steps=3) == text + 3 * unet + vae
    assert unet == flops.unet(TINY.unet, 2, 8, 8)
    with pytest.raises(ValueError, match="unknown component"):
        flops.component_flops(TINY, "refiner", h, w)


def _torch_count(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _diffusers_modules(cfg, device):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    from sdxl_ms.weights.diffusers_configs import pipeline_configs

    configs = pipeline_configs(cfg)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    for m in (unet, vae):  # plain matmul attention, which the flop counter sees
        m.set_attn_processor(AttnProcessor())
    return configs, unet, vae


def test_flops_equal_torch_flop_counter_on_tiny_diffusers_modules():
    """An independent count: torch's dispatcher-level counter on diffusers/transformers."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs, unet, vae = _diffusers_modules(TINY, "cpu")
    b, lh = 2, 8
    x = torch.randn(b, 4, lh, lh)
    ctx = torch.randn(b, 77, TINY.unet.context_dim)
    cond = {"text_embeds": torch.randn(b, TINY.conditioner.pooled_dim), "time_ids": torch.randn(b, 6)}
    assert _torch_count(lambda: unet(x, torch.full((b,), 500.0), encoder_hidden_states=ctx,
                                     added_cond_kwargs=cond)) == flops.unet(TINY.unet, b, lh, lh)
    z = torch.randn(1, 4, lh, lh)
    assert _torch_count(lambda: vae.decode(z)) == flops.vae_decode(TINY.vae, 1, lh, lh)

    def eager(config):  # matmul attention (the counter does not see CPU SDPA kernels)
        config = CLIPTextConfig(**config)
        config._attn_implementation = "eager"
        return config

    ids = torch.randint(0, 1000, (2, 77))
    te = CLIPTextModel(eager(configs["text_encoder"]))
    te2 = CLIPTextModelWithProjection(eager(configs["text_encoder_2"]))
    assert _torch_count(lambda: te(ids)) == flops.text_encoder(TINY.conditioner.clip_l, 2)
    assert _torch_count(lambda: te2(ids)) == flops.text_encoder(TINY.conditioner.clip_g, 2,
                                                                project=True)


def test_sdxl_base_unet_flops_equal_torch_flop_counter_on_meta():
    """Full size without memory: the diffusers SDXL UNet on torch's meta device."""
    import torch

    _, unet, _ = _diffusers_modules(SDXL_BASE, "meta")
    with torch.device("meta"):
        x = torch.empty(2, 4, 128, 128)
        ctx = torch.empty(2, 77, 2048)
        cond = {"text_embeds": torch.empty(2, 1280), "time_ids": torch.empty(2, 6)}
        got = _torch_count(lambda: unet(x, torch.empty(2), encoder_hidden_states=ctx,
                                        added_cond_kwargs=cond))
    want = flops.component_flops(SDXL_BASE, "unet", 1024, 1024)
    assert got == want == 13_522_472_796_160  # ~6.8 TFLOP per image and step at 1024x1024


# ---- statistics, entries, ratios ------------------------------------------------------------

def test_stats_are_pytest_benchmarks():
    from pytest_benchmark.stats import Stats

    samples = [0.31, 0.29, 0.35, 0.30, 0.90]
    ours = report.stats_from_samples(samples)
    s = Stats()
    for x in samples:
        s.update(x)
    for key in ("min", "max", "mean", "stddev", "median", "rounds", "q1", "q3", "iqr"):
        assert ours[key] == pytest.approx(getattr(s, key))
    plain = report._plain_stats(samples)  # the fallback without pytest-benchmark
    for key in ("min", "max", "mean", "stddev", "median", "rounds", "total"):
        assert plain[key] == pytest.approx(ours[key])
    assert ours["median"] == 0.31 and ours["rounds"] == 5


def _record(component, side, samples, peak=500 << 20, flops_=10 ** 9, mode=None):
    mode = mode or ("pynative" if side == "port" else "eager")
    spec = Spec(component, side, mode, preset="tiny", height=64, width=64, rounds=len(samples))
    return {"spec": json.loads(spec.to_json()), "samples_s": list(samples), "warmup_s": [0.5],
            "first_call_s": 0.5, "compile_s": None, "load_s": 2.0,
            "baseline_rss_bytes": 300 << 20, "loaded_rss_bytes": peak - (10 << 20),
            "peak_rss_bytes": peak, "device_peak_bytes": None, "flops": flops_,
            "weights": spec.weights_note(), "framework": "x", "device": "cpu", "threads": 1}


def _records():
    return [_record("text", "port", [0.30, 0.32, 0.31]), _record("text", "reference", [0.10, 0.12, 0.11]),
            _record("unet", "port", [2.0, 2.4, 2.2, 2.1], peak=900 << 20),
            _record("unet", "reference", [0.05, 0.04, 0.06, 0.05], peak=700 << 20)]


def test_entries_follow_pytest_benchmark_format_and_ratios_are_median_quotients():
    results = report.build_results(_records(), {"preset": "tiny", "height": 64, "width": 64})
    for key in ("machine_info", "commit_info", "benchmarks", "datetime", "version", "ratios"):
        assert key in results
    entry = results["benchmarks"][2]
    assert entry["name"] == "unet[port-pynative]" and entry["group"] == "unet"
    assert entry["stats"]["median"] == pytest.approx(2.15)
    for field in ("component", "side", "mode", "peak_rss_bytes", "device_peak_bytes", "flops",
                  "flops_per_s", "compile_s"):
        assert field in entry["extra_info"]
    assert entry["extra_info"]["flops_per_s"] == pytest.approx(1e9 / 2.15)

    medians = {(e["extra_info"]["component"], e["extra_info"]["side"]): e["stats"]["median"]
               for e in results["benchmarks"]}
    assert [r["component"] for r in results["ratios"]] == ["text", "unet"]
    for r in results["ratios"]:
        assert r["port_median_s"] == medians[(r["component"], "port")]
        assert r["reference_median_s"] == medians[(r["component"], "reference")]
        assert r["ratio"] == pytest.approx(r["port_median_s"] / r["reference_median_s"])
    assert results["ratios"][1]["ratio"] == pytest.approx(2.15 / 0.05)
    json.dumps(results)  # serialisable as is


def test_no_ratio_without_both_sides():
    only_port = [report.benchmark_entry(_record("vae", "port", [1.0]))]
    assert report.compute_ratios(only_port) == []


# ---- writers ---------------------------------------------------------------------------------

def test_markdown_table_on_synthetic_results():
    results = report.build_results(_records()[:3], {"preset": "tiny", "height": 64, "width": 64,
                                                    "rounds": 3, "warmup": 1, "steps": 4},
                                   failures=[{"component": "unet", "side": "reference",
                                              "mode": "eager", "error": "out of memory"}])
    md = report.render_markdown(results)
    lines = md.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| component | port median"))
    assert lines[header] == ("| component | port median | reference median | ratio | port peak RSS "
                             "| ref peak RSS | GFLOP/s (port / ref) |")
    assert lines[header + 2] == ("| text | 310.0 ms | 110.0 ms | **2.82x** | 500 MiB | 500 MiB "
                                 "| 3.23 / 9.09 |")
    assert lines[header + 3].startswith("| unet (port only) | 2.15 s | - | - | 900 MiB | - |")
    assert "FAILED unet reference (eager): out of memory" in md


def test_ratio_chart_is_a_png_with_bars_on_either_side_of_parity():
    from PIL import Image

    ratios = [{"component": "text", "port_mode": "pynative", "ratio": 4.0},
              {"component": "vae", "port_mode": "pynative", "ratio": 0.5}]
    png = charts.ratio_chart_png(ratios, width=760)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and img.size[0] == 760
    lo, hi = charts.axis_range([4.0, 0.5])
    left, plot_w = 170, 760 - 170 - 70

    def x(v):
        return int(left + (np.log10(v) - np.log10(lo)) / (np.log10(hi) - np.log10(lo)) * plot_w)

    row_mid = [54 + 36 * i + 18 for i in range(2)]
    assert img.getpixel((x(2.0), row_mid[0])) == charts.SLOWER  # text: right of 1.0, red
    assert img.getpixel((x(0.7), row_mid[1])) == charts.FASTER  # vae: left of 1.0, green
    assert img.getpixel((x(0.6), row_mid[0])) == (255, 255, 255)  # nothing left of 1.0
    empty = Image.open(io.BytesIO(charts.ratio_chart_png([])))
    assert empty.format == "PNG"


def test_log_ticks():
    assert charts.log_ticks(0.5, 2.0) == [0.5, 1.0, 2.0]
    assert charts.log_ticks(0.01, 1000) == [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


# ---- the runner (measurements injected: no timing here) ------------------------------------

def _args(tmp_path, *argv):
    args = runner.build_parser().parse_args(["--out", str(tmp_path / "out"), *argv])
    args.argv = list(argv)
    return args


def test_runner_writes_the_three_outputs_atomically(tmp_path, capsys):
    seen = []

    def fake_measure(spec, timeout):
        seen.append((spec.component, spec.side, spec.mode))
        base = {"text": 0.3, "unet": 2.0, "vae": 1.0, "pipeline": 9.0}[spec.component]
        scale = 1.0 if spec.side == "port" else 0.25
        rec = _record(spec.component, spec.side, [base * scale * f for f in (1.0, 1.1, 0.9)],
                      flops_=spec.flops())
        rec["spec"] = json.loads(spec.to_json())
        return rec

    rc = runner.run(_args(tmp_path, "--rounds", "3"), measure=fake_measure)
    assert rc == 0
    assert seen == [(c, s, m) for c in flops.COMPONENTS
                    for s, m in (("port", "pynative"), ("reference", "eager"))]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ratios.png", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["checkpoint"]  # tiny defaults to the cached seeded checkpoint
    assert [r["ratio"] for r in results["ratios"]] == pytest.approx([4.0] * 4)
    assert results["benchmarks"][0]["extra_info"]["flops"] == flops.component_flops(TINY, "text", 64, 64)
    assert "| pipeline | 9.00 s | 2.25 s | **4.00x** |" in (out / "results.md").read_text()
    assert "| pipeline | 9.00 s | 2.25 s | **4.00x** |" in capsys.readouterr().out


def test_repeats_interleave_passes_and_pool_samples(tmp_path):
    """A machine that slows down 2x between passes: per-pass medians show the drift, pooled
    medians keep both sides' ratio at the true 2.0, RSS is the worst pass's."""
    seen = []

    def drifting(spec, timeout):
        seen.append(spec.side)
        slow = 2.0 if len(seen) > 2 else 1.0  # the second pass runs on a slower machine
        base = 2.0 if spec.side == "port" else 1.0
        rec = _record("unet", spec.side, [base * slow * f for f in (0.9, 1.0, 1.1)],
                      peak=(500 + 100 * len(seen)) << 20)
        rec["compile_s"] = None
        return rec

    args = _args(tmp_path, "--components", "unet", "--repeats", "2", "--rounds", "3")
    assert runner.run(args, measure=drifting) == 0
    assert seen == ["port", "reference", "port", "reference"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    port = next(b for b in results["benchmarks"] if b["extra_info"]["side"] == "port")
    assert port["stats"]["rounds"] == 6
    assert port["extra_info"]["pass_medians_s"] == pytest.approx([2.0, 4.0])
    assert port["extra_info"]["peak_rss_bytes"] == 800 << 20
    assert results["ratios"][0]["ratio"] == pytest.approx(2.0)
    assert results["run"]["repeats"] == 2
    assert "2 interleaved passes" in (tmp_path / "out" / "results.md").read_text()


def test_a_measurement_failing_in_one_pass_is_not_retried(tmp_path):
    calls = []

    def flaky(spec, timeout):
        calls.append(spec.side)
        if spec.side == "reference":
            raise runner.MeasureError("out of memory")
        return _record("vae", "port", [1.0])

    args = _args(tmp_path, "--components", "vae", "--repeats", "3")
    assert runner.run(args, measure=flaky) == 1
    assert calls == ["port", "reference", "port", "port"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["failures"]) == 1 and results["ratios"] == []


def test_runner_records_a_failed_measurement_and_exits_1(tmp_path):
    def failing(spec, timeout):
        if spec.side == "reference":
            raise runner.MeasureError("boom")
        return _record(spec.component, spec.side, [1.0])

    assert runner.run(_args(tmp_path, "--components", "vae"), measure=failing) == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failures"] == [{"component": "vae", "side": "reference", "mode": "eager",
                                    "error": "boom"}]
    assert results["ratios"] == []


@pytest.mark.parametrize("argv, message", [
    (["--components", "text,refiner"], "unknown component(s) refiner"),
    (["--port-modes", "graph,turbo"], "unknown port mode turbo; choose from pynative, graph, "
                                      "graph-blocks"),
    (["--height", "60"], "positive multiples of 8"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such file or folder"),
    (["--reference-device", "tpu"], "use cpu or cuda[:N]"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert runner.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("sdxl-bench: error:")
    assert not (tmp_path / "o").exists()


def test_reference_cuda_without_cuda_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.main(["--reference-device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sdxl-bench: error: --reference-device cuda: torch.cuda is not available on "
                   f"this machine (torch {torch.__version__}); use --reference-device cpu"]


def test_graph_mode_reports_its_compile_time_apart():
    """A compiling port mode, in its own process: the first call's compile is reported as
    compile_s, and the timed rounds (after the warm-up) exclude it."""
    from sdxl_ms.weights.synthetic import cached_checkpoint

    spec = Spec("text", "port", "graph", warmup=1, rounds=2,
                checkpoint=str(cached_checkpoint("tiny", 0)))
    rec = runner.measure_in_subprocess(spec, timeout=600)
    assert rec["compile_s"] is not None and rec["compile_s"] > 0
    assert len(rec["samples_s"]) == 2 and max(rec["samples_s"]) < rec["compile_s"]


def test_one_real_measurement_per_side(tmp_path):
    """The measurement code end to end on the tiny text encoders, in process (fast)."""
    from benchmarks.measure import measure
    from sdxl_ms.weights.synthetic import cached_checkpoint

    ckpt = str(cached_checkpoint("tiny", 0))
    for side, mode in (("port", "pynative"), ("reference", "eager")):
        rec = measure(Spec("text", side, mode, warmup=0, rounds=2, checkpoint=ckpt))
        assert len(rec["samples_s"]) == 2 and all(s > 0 for s in rec["samples_s"])
        assert 100 << 20 < rec["baseline_rss_bytes"] <= rec["peak_rss_bytes"] < 8 << 30
        assert rec["loaded_rss_bytes"] <= rec["peak_rss_bytes"]
        assert rec["device_peak_bytes"] is None  # CPU
        assert rec["flops"] == flops.encode_prompt(TINY) and rec["compile_s"] is None
        assert rec["materialised"]


def test_subprocess_failure_is_reported_in_one_line():
    spec = Spec("vae", "reference", "eager", checkpoint="/nonexistent/folder", rounds=1)
    with pytest.raises(runner.MeasureError) as err:
        runner.measure_in_subprocess(spec, timeout=300)
    assert len(str(err.value).splitlines()) == 1 and "nonexistent" in str(err.value)


def test_spec_round_trips_and_validates():
    spec = Spec("unet", "port", "pynative", preset="sdxl-base", height=256, width=256, threads=1)
    assert Spec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="no mode 'turbo'"):
        Spec("unet", "port", "turbo")
    with pytest.raises(ValueError, match="unknown side"):
        Spec("unet", "npu", "pynative")
    assert "differ" in Spec("unet", "port", "pynative").weights_note()


# ---- the regression gate -------------------------------------------------------------------

@pytest.fixture
def baseline_file(tmp_path):
    results = report.build_results(_records(), {"preset": "tiny", "height": 64, "width": 64})
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(results))
    return path, results


def _doctored(tmp_path, results, name="current.json", **changes):
    """Copy of `results` with (component, side) -> (median factor, peak RSS factor)."""
    out = copy.deepcopy(results)
    for e in out["benchmarks"]:
        key = f"{e['extra_info']['component']}_{e['extra_info']['side']}"
        if key in changes:
            time_f, rss_f = changes[key]
            e["stats"]["median"] *= time_f
            e["extra_info"]["peak_rss_bytes"] = int(e["extra_info"]["peak_rss_bytes"] * rss_f)
    path = tmp_path / name
    path.write_text(json.dumps(out))
    return path


def test_compare_passes_on_equal_results(baseline_file, capsys):
    path, results = baseline_file
    assert runner.main(["compare", str(path), str(path), "--fail-over", "10%"]) == 0
    assert "nothing moved by more than 10%" in capsys.readouterr().out


def test_compare_fails_on_a_slower_port(baseline_file, tmp_path, capsys):
    path, results = baseline_file
    slower = _doctored(tmp_path, results, unet_port=(1.5, 1.0))
    assert runner.main(["compare", str(path), str(slower), "--fail-over", "10%"]) == 1
    out = capsys.readouterr().out
    assert "| unet | port | pynative | median | 2.15 s | 3.23 s | +50.0% | REGRESSED |" in out
    assert "FAIL: 1 regression(s)" in out


def test_compare_fails_on_a_bigger_port_and_tolerates_small_moves(baseline_file, tmp_path):
    path, results = baseline_file
    bigger = _doctored(tmp_path, results, text_port=(1.0, 1.25))
    assert compare.main([str(path), str(bigger), "--fail-over", "10%"]) == 1
    within = _doctored(tmp_path, results, "within.json", unet_port=(1.05, 1.09))
    assert compare.main([str(path), str(within), "--fail-over", "10%"]) == 0
    faster = _doctored(tmp_path, results, "faster.json", unet_port=(0.5, 0.5))
    assert compare.main([str(path), str(faster)]) == 0


def test_compare_gates_the_reference_only_when_asked(baseline_file, tmp_path):
    path, results = baseline_file
    ref_slower = _doctored(tmp_path, results, unet_reference=(2.0, 1.0))
    assert compare.main([str(path), str(ref_slower)]) == 0
    assert compare.main([str(path), str(ref_slower), "--sides", "port,reference"]) == 1


@pytest.mark.parametrize("content, threshold, message", [
    ("{not json", "10%", "malformed JSON"),
    ('{"benchmarks": "nope"}', "10%", "not a benchmark results file"),
    ('{"benchmarks": [{"name": "x", "stats": {}}]}', "10%", "has no numeric stats.median"),
    (None, "10%", "no such file"),
    ("VALID", "ten percent", "bad threshold"),
    ("VALID", "=-5%", "bad threshold"),
])
def test_compare_exits_2_on_bad_input(baseline_file, tmp_path, capsys, content, threshold, message):
    path, _ = baseline_file
    current = tmp_path / "current.json"
    if content == "VALID":
        current = path
    elif content is not None:
        current.write_text(content)
    flag = ["--fail-over" + threshold] if threshold.startswith("=") else ["--fail-over", threshold]
    assert compare.main([str(path), str(current), *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("sdxl-bench compare: error:")


def test_parse_threshold():
    assert compare.parse_threshold("10%") == pytest.approx(0.10)
    assert compare.parse_threshold("0.25") == 0.25
    assert compare.parse_threshold("0%") == 0.0
    assert compare.parse_threshold("150%") == pytest.approx(1.5)
    with pytest.raises(compare.BadInput, match=r"write 25% for a percentage, or 0.25 as a fraction"):
        compare.parse_threshold("25")  # once a 2500% gate that passed everything


def test_compare_warns_when_the_runs_differ(baseline_file, tmp_path, capsys):
    path, results = baseline_file
    other = copy.deepcopy(results)
    other["run"]["height"] = 128
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    assert compare.main([str(path), str(other_path)]) == 0
    assert "warning: the runs differ in height: 64 -> 128" in capsys.readouterr().err


# ---- the graph-mode hook -------------------------------------------------------------------

def test_a_compiling_port_mode_plugs_in_with_its_compile_time_apart(tmp_path, monkeypatch):
    """What graph mode will do: register a Mode; the runner measures it beside PyNative and
    reports the first call's excess over the median as compile_s."""
    from benchmarks import workloads
    from benchmarks.measure import make_record

    monkeypatch.setitem(workloads.PORT_MODES, "graph", workloads.Mode("graph", compiles=True))
    idle = workloads.Workload(call=lambda: None, info={})
    graph = make_record(Spec("unet", "port", "graph"), idle, [1.0, 1.2, 1.1], [5.0], 5.0,
                        None, None, None)
    assert graph["compile_s"] == pytest.approx(3.9)
    assert make_record(Spec("unet", "port", "pynative"), idle, [1.0], [5.0], 5.0,
                       None, None, None)["compile_s"] is None

    def fake_measure(spec, timeout):
        rec = _record(spec.component, spec.side, [{"graph": 0.5}.get(spec.mode, 1.0)],
                      mode=spec.mode)
        rec["compile_s"] = 3.0 if spec.mode == "graph" else None
        return rec

    args = _args(tmp_path, "--components", "unet", "--port-modes", "pynative,graph",
                 "--random-weights")
    assert runner.run(args, measure=fake_measure) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["port_mode"], r["ratio"]) for r in results["ratios"]] == [("pynative", 1.0),
                                                                         ("graph", 0.5)]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| unet (graph) | 500.0 ms | 1.00 s | **0.50x** |" in md
    assert "| unet | port | graph | cpu | 1 | 500.0 ms | 500.0 ms | 500.0 ms | 500.0 ms | 3.00 s |" in md


def test_the_runner_knows_every_preset_without_importing_mindspore():
    from benchmarks.runner import PRESET_NAMES
    from sdxl_ms.config import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)
