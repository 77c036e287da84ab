"""Atomic writes: a reader never sees a half-written file or folder.

Every file the project writes (checkpoints, recordings, reports, PNGs, the tokenizer cache) goes
through this module. Content is written to a temporary sibling (same file system, so the final
`os.replace` is an atomic rename), flushed and fsynced, then renamed over the destination. If
the writer raises, or the user presses Ctrl-C, the temporary is removed and any previous version
of the destination is left as it was.

`tempfile.mkstemp`/`mkdtemp` create private 0600/0700 entries; these are shared artefacts, so
the result gets the mode a plain `open()`/`mkdir()` would give under the current umask (0644 and
0755 under the usual 022), or the mode of the file it replaces.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What `open(path, "w")` would create: 0666 less the umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """What `mkdir` would create: 0777 less the umask."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer (e.g. a library that takes a file
    name); on a clean exit it is fsynced and renamed over `path`, else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = default_file_mode()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str = "utf-8",
                newline: Optional[str] = None) -> Iterator[IO]:
    """`open(path, mode)` that only replaces `path` once the block finishes without error.
    `mode` is "w" (text) or "wb" (bytes)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        if mode == "wb":
            f = open(tmp, "wb")
        else:
            f = open(tmp, "w", encoding=encoding, newline=newline)
        with f:
            yield f


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and return the path."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on a clean exit it is renamed to `path`
    (an existing `path` is removed first when `replace`, else the rename fails if another
    writer got there first), else deleted with everything in it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, default_dir_mode())
        yield tmp
        if replace and path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
