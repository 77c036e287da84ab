"""A checkpoint's content hash is computed once per file and remembered on disk by the file's
identity (path, inode, size, modification time): `sdxl-parity run` asks for it in two
processes, and sdxl-base's 13 GB took about 10 s each time."""
from __future__ import annotations

import hashlib
import os

from parity import recording


def test_a_file_is_hashed_once_and_rehashed_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first content")
    reads = []
    real = recording.file_sha256
    monkeypatch.setattr(recording, "file_sha256", lambda p: reads.append(p) or real(p))

    want = hashlib.sha256(b"first content").hexdigest()
    assert recording.stored_file_sha256(path) == want
    assert recording.stored_file_sha256(path) == want  # another process would find it too
    assert len(reads) == 1

    path.write_bytes(b"other content")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert recording.stored_file_sha256(path) == hashlib.sha256(b"other content").hexdigest()
    assert len(reads) == 2


def test_an_unwritable_cache_still_gives_the_hash(tmp_path, monkeypatch):
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("SDXL_PARITY_CACHE", str(blocked))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"content")
    assert recording.stored_file_sha256(path) == hashlib.sha256(b"content").hexdigest()


def test_a_folder_checkpoint_hash_covers_every_file(tmp_path):
    """A diffusers folder's hash is over each file's path and hash: a changed file changes it."""
    folder = tmp_path / "ckpt"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"a")
    (folder / "model_index.json").write_text("{}")
    before = recording.checkpoint_sha256(folder)
    (folder / "unet" / "w.bin").write_bytes(b"b")
    os.utime(folder / "unet" / "w.bin", ns=(1, 2))
    assert recording.checkpoint_sha256(folder) != before
