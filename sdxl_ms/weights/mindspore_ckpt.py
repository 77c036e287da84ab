"""MindSpore's own checkpoint format (`.ckpt`), read and written tensor by tensor.

A `.ckpt` is one protobuf message (`mindspore/train/checkpoint.proto`):
    Checkpoint  { repeated Value value = 1; }
    Value       { string tag = 1; TensorProto tensor = 2; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }
No pickle is involved. `mindspore.load_checkpoint` parses the whole message into memory; here
one pass over the wire format records where each tensor's bytes lie, and `get` reads just that
range, so a full-size checkpoint is never resident at once. `write_ckpt` streams the same
format (`mindspore.load_checkpoint` reads it back: tested).

Names: the sgm single-file names, as mindone's SDXL conversion writes them; MindSpore's own
norm and embedding names (`gamma`, `beta`, `embedding_table`) read as `weight`, `bias`,
`weight`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Tuple

import numpy as np

from .safetensors_io import CheckpointError

# tensor_type strings MindSpore writes -> numpy dtypes (bfloat16 is read through uint16)
TENSOR_TYPES = {"Float16": np.float16, "Float32": np.float32, "Float64": np.float64,
                "BFloat16": np.uint16, "Int32": np.int32, "Int64": np.int64}
NUMPY_TYPES = {np.dtype(np.float16): "Float16", np.dtype(np.float32): "Float32",
               np.dtype(np.float64): "Float64", np.dtype(np.int32): "Int32",
               np.dtype(np.int64): "Int64"}
MINDSPORE_NAMES = {".gamma": ".weight", ".beta": ".bias", ".embedding_table": ".weight"}


def canonical_name(name: str) -> str:
    for suffix, ours in MINDSPORE_NAMES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + ours
    return name


# ---- protobuf wire format ----------------------------------------------------------------------

def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


class MindSporeCheckpoint:
    """A `.ckpt` indexed in one pass: name -> (tensor_type, shape, offset, nbytes)."""

    format = "mindspore"  # checkpoint.MINDSPORE

    def __init__(self, path: Path):
        self.path = Path(path)
        self._index: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        try:
            with open(self.path, "rb") as f:
                self._scan(f, os.fstat(f.fileno()).st_size)
        except (EOFError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} is not a MindSpore checkpoint or is truncated "
                                  f"({type(e).__name__}); write it again") from None
        self.shapes: Dict[str, Tuple[int, ...]] = {n: v[1] for n, v in self._index.items()}

    def _scan(self, f: BinaryIO, size: int) -> None:
        while f.tell() < size:
            key = _varint(f)
            length = _varint(f)
            end = f.tell() + length
            if end > size:
                raise EOFError
            if key != (1 << 3 | 2):  # not a Value: skip it
                f.seek(end)
                continue
            tag, tensor = None, None
            while f.tell() < end:
                k = _varint(f)
                n = _varint(f)
                if k == (1 << 3 | 2):
                    tag = f.read(n).decode("utf-8")
                elif k == (2 << 3 | 2):
                    tensor = self._tensor(f, f.tell() + n)
                else:
                    f.seek(f.tell() + n)
            if f.tell() != end or tag is None:
                raise ValueError("malformed value")
            if tensor is not None:  # map tensors (embedding caches) are not weights
                self._index[canonical_name(tag)] = tensor

    @staticmethod
    def _tensor(f: BinaryIO, end: int):
        dims, ttype, offset, nbytes = [], None, None, 0
        while f.tell() < end:
            k = _varint(f)
            field, wire = k >> 3, k & 7
            if field == 1 and wire == 0:
                dims.append(_varint(f))
            elif field == 1 and wire == 2:  # packed dims
                stop = f.tell() + _varint(f)
                while f.tell() < stop:
                    dims.append(_varint(f))
            elif field == 2:
                ttype = f.read(_varint(f)).decode("utf-8")
            elif field == 3:
                nbytes = _varint(f)
                offset = f.tell()
                f.seek(offset + nbytes)
            else:
                raise ValueError(f"unexpected field {field}")
        if ttype not in TENSOR_TYPES:
            raise ValueError(f"tensor type {ttype!r}")
        return ttype, tuple(dims), offset, nbytes

    def get(self, name: str) -> np.ndarray:
        ttype, shape, offset, nbytes = self._index[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = f.read(nbytes)
        a = np.frombuffer(raw, dtype=TENSOR_TYPES[ttype])
        if ttype == "BFloat16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.reshape(shape).copy()


def write_ckpt(f: BinaryIO, items: Iterable[Tuple[str, np.ndarray]]) -> int:
    """Stream (name, array) pairs into an open binary file as a MindSpore checkpoint; returns
    the tensor count. Each tensor is written as it comes, nothing is gathered."""
    count = 0
    for name, array in items:
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (ascontiguousarray would make a scalar 1-d)
            array = array.copy(order="C")
        ttype = NUMPY_TYPES.get(array.dtype)
        if ttype is None:
            raise ValueError(f"{name}: dtype {array.dtype} has no MindSpore checkpoint type")
        dims = b"".join(_key(1, 0) + _encode_varint(d) for d in array.shape)
        type_bytes = ttype.encode()
        content_len = array.nbytes
        tensor_len = (len(dims) + len(_key(2, 2)) + len(_encode_varint(len(type_bytes)))
                      + len(type_bytes) + len(_key(3, 2)) + len(_encode_varint(content_len))
                      + content_len)
        tag = name.encode()
        value_head = _key(1, 2) + _encode_varint(len(tag)) + tag + _key(2, 2) + \
            _encode_varint(tensor_len)
        value_len = len(value_head) + tensor_len
        f.write(_key(1, 2) + _encode_varint(value_len) + value_head + dims + _key(2, 2)
                + _encode_varint(len(type_bytes)) + type_bytes + _key(3, 2)
                + _encode_varint(content_len))
        array.tofile(f)
        count += 1
    return count


def is_mindspore_ckpt(path: Path) -> bool:
    """A `.ckpt` whose first bytes are a protobuf Checkpoint.value (not a zip or pickle)."""
    with open(path, "rb") as f:
        head = f.read(1)
    return path.suffix == ".ckpt" and head == b"\x0a"
