"""`sdxl-ms generate`: PNGs from the embedded tiny checkpoint, determinism, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_ms.cli import main

FAST = ["--steps", "2", "--quiet"]


def test_default_checkpoint_writes_png_with_metadata(tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a red cube", "--out", str(out), *FAST]) == 0
    im = Image.open(out)
    im.load()
    assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    assert im.text["prompt"] == "a red cube"
    assert im.text["seed"] == "0" and im.text["sampler"] == "euler" and im.text["steps"] == "2"
    assert im.text["guidance"] == "5.0"
    assert np.asarray(im).std() > 1.0  # not a flat image


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert main(["generate", "--prompt", "p", "--seed", seed, "--out", str(path), *FAST]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_several_images_into_a_folder(tmp_path):
    assert main(["generate", "--num-images", "2", "--out", str(tmp_path / "imgs"), *FAST]) == 0
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["sdxl-seed0-0.png", "sdxl-seed0-1.png"]


@pytest.mark.parametrize("args, message", [
    (["--height", "60"], "multiple of 8"),
    (["--width", "100"], "multiple of 8"),
    (["--steps", "0"], "must be >= 1"),
    (["--sampler", "ddim"], "unknown sampler 'ddim'"),
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--checkpoint", "/definitely/not/here"], "checkpoint not found"),
])
def test_bad_input_exits_2_with_one_line_and_no_file(tmp_path, capsys, args, message):
    out = tmp_path / "never.png"
    assert main(["generate", "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("sdxl-ms: error:")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_output_path(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["generate", "--out", str(blocker / "x.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
