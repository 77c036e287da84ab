"""Where the project caches what it makes (seeded checkpoints, tokenizer files, conversions)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SDXL_PARITY_CACHE"


def cache_dir() -> Path:
    """`$SDXL_PARITY_CACHE`, else `$XDG_CACHE_HOME/sdxl-parity`, else `~/.cache/sdxl-parity`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdxl-parity"
