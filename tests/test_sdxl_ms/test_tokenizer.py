"""The offline CLIP tokenizers: real CLIP ids, SDXL's two pad tokens, truncation, file format."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from sdxl_ms.tokenizer import (MAX_LENGTH, VOCAB_SIZE, load_tokenizer, tokenize, tokenizer_dir,
                               write_tokenizer_files)

BOS, EOS = 49406, 49407
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
PADS = {"<|endoftext|>": EOS, "!": 0}  # CLIP-L, bigG (diffusers tokenizer_2)


@pytest.mark.parametrize("pad_token", list(PADS))
def test_folder_loads_as_diffusers_does(tmp_path, pad_token):
    from transformers import CLIPTokenizer

    write_tokenizer_files(tmp_path / "tokenizer", pad_token)
    # diffusers: CLIPTokenizer.from_pretrained(<checkpoint>, subfolder="tokenizer[_2]")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer",
                                        local_files_only=True)
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == MAX_LENGTH
    assert tok.pad_token == pad_token and tok.pad_token_id == PADS[pad_token]
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    vocab = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == BOS
    merges = (tmp_path / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894


@pytest.mark.parametrize("pad_token", list(PADS))
def test_real_clip_ids_and_padding(pad_token):
    ids = tokenize(load_tokenizer(pad_token), [PROMPT, ""])
    assert ids.dtype == np.int64 and ids.shape == (2, MAX_LENGTH)
    pad = PADS[pad_token]
    # the published CLIP ids of this prompt ("8k" is "8", "k")
    expected = [BOS, 18376, 530, 320, 10865, 267, 3153, 3140, 13901, 267, 48028, 5389, 267,
                12609, 267, 279, 330, EOS]
    assert ids[0, :len(expected)].tolist() == expected
    assert (ids[0, len(expected):] == pad).all()
    assert ids[1].tolist() == [BOS, EOS] + [pad] * (MAX_LENGTH - 2)


@pytest.mark.parametrize("pad_token", list(PADS))
def test_long_prompt_truncates_with_eos_last(pad_token):
    prompt = " ".join(f"word{i}" for i in range(200))
    ids = tokenize(load_tokenizer(pad_token), [prompt])
    assert ids.shape == (1, MAX_LENGTH)
    assert ids[0, 0] == BOS and ids[0, -1] == EOS
    assert EOS not in ids[0, :-1].tolist() and PADS[pad_token] not in ids[0, 1:-1].tolist()


def test_cache_folder_is_written_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_PARITY_CACHE", str(tmp_path))
    first = tokenizer_dir("!")
    stamp = (first / "vocab.json").stat().st_mtime_ns
    again = tokenizer_dir("!")
    assert again == first and (again / "vocab.json").stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "tokenizers"
    names = sorted(p.name for p in first.parent.iterdir())
    assert names == [first.name]  # no temporary folders left behind
    assert tokenizer_dir("<|endoftext|>") != first


def test_tokenizing_needs_no_torch(tmp_path):
    """Import, write, load and tokenize with torch made unimportable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from sdxl_ms.tokenizer import load_tokenizer, tokenize\n"
            "ids = tokenize(load_tokenizer('!'), ['a photo of a cat'])\n"
            "assert ids[0, :6].tolist() == [49406, 320, 1125, 539, 320, 2368], ids\n")
    env = dict(os.environ, SDXL_PARITY_CACHE=str(tmp_path))
    root = REPO_ROOT
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
