"""CLIP BPE tokenizers for SDXL, built offline from the bundled open_clip vocabulary.

No hub is reachable here, so the Hugging Face tokenizer files (vocab.json, merges.txt and two
small JSON configs) are derived from `assets/bpe_simple_vocab_16e6.txt.gz` (open_clip, MIT) the
way Hugging Face derived theirs: 256 byte-level symbols, the same with `</w>`, one token per merge
for the first 48,894 merges, then `<|startoftext|>` and `<|endoftext|>` (49,408 tokens).
The two SDXL tokenizers differ only in the pad token: CLIP-L pads with `<|endoftext|>` (49407),
the bigG tokenizer (diffusers `tokenizer_2`) with `!` (id 0).

`transformers` is imported lazily, so importing this module needs neither it nor torch.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sdxl_common.atomic import atomic_dir
from sdxl_common.errors import InputWarning
from sdxl_common.paths import cache_dir

BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
MERGES_HEADER = "#version: 0.2"
_FORMAT_VERSION = "1"  # bump when the written files change, so stale caches are not reused
_NAMES = {EOS: "clip-l", "!": "clip-g"}


def _byte_symbols() -> List[str]:
    """The 256 printable stand-ins of byte-level BPE, in GPT-2/CLIP id order.

    Bytes that are already visible characters keep their own code point and come first; the
    others (controls, space, a few Latin-1 gaps) are moved to 256, 257, ... in byte order.
    """
    visible = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
    kept = set(visible)
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(moved))]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> Tuple[Dict[str, int], Tuple[str, ...]]:
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(lines[1:1 + NUM_MERGES])  # line 0 is the file's version header
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{BPE_PATH} does not hold {NUM_MERGES} BPE merges")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived vocabulary has {len(vocab)} distinct tokens, not {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(folder, pad_token: str) -> None:
    """Write a `CLIPTokenizer` folder (what diffusers' `tokenizer/` and `tokenizer_2/` hold)."""
    vocab, merges = _vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("\n".join((MERGES_HEADER,) + merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH,
                  do_lower_case=True, add_prefix_space=False, errors="replace",
                  clean_up_tokenization_spaces=True)
    for name, content in (("special_tokens_map.json", special),
                          ("tokenizer_config.json", config)):
        with open(folder / name, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)


def tokenizer_dir(pad_token: str) -> Path:
    """A complete tokenizer folder for `pad_token`, written once into the cache, atomically
    (a concurrent or interrupted writer never leaves a half-written folder behind)."""
    digest = hashlib.sha1(pad_token.encode("utf-8")).hexdigest()[:8]
    name = f"{_NAMES.get(pad_token, 'pad-' + digest)}-v{_FORMAT_VERSION}"
    final = cache_dir() / "tokenizers" / name
    if (final / "tokenizer_config.json").is_file():
        return final
    try:
        with atomic_dir(final) as tmp:
            write_tokenizer_files(tmp, pad_token)
    except OSError:
        if (final / "tokenizer_config.json").is_file():  # another process won the race
            return final
        # a read-only cache: fall back to a per-process folder
        tmp = Path(tempfile.mkdtemp(prefix=f"sdxl_ms-{name}-"))
        write_tokenizer_files(tmp, pad_token)
        return tmp
    return final


@functools.lru_cache(maxsize=None)
def load_tokenizer(pad_token: str):
    """A `transformers.CLIPTokenizer` with the given pad token, loaded without network."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir(pad_token)), local_files_only=True)


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Token ids (B, 77) int64: BOS, text, EOS, then padding; long prompts are cut to 77 with
    EOS kept as the last token (what diffusers' `encode_prompt` feeds the encoders)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    for prompt, ids in zip(prompts, tokenizer(prompts, truncation=False, verbose=False)["input_ids"]):
        if len(ids) > MAX_LENGTH:
            warnings.warn(f"prompt {_preview(prompt)} is {len(ids)} tokens; the text encoders "
                          f"read {MAX_LENGTH} (with start and end), the rest is dropped",
                          InputWarning, stacklevel=2)
    out = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="np")
    return np.asarray(out["input_ids"], dtype=np.int64)


def _preview(prompt: str, width: int = 40) -> str:
    return repr(prompt if len(prompt) <= width else prompt[:width - 3] + "...")
