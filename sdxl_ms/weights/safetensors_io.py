"""Streaming safetensors I/O: write a multi-GB file one tensor at a time, atomically.

`safetensors.numpy.save_file` needs every tensor in memory at once (about 10 GB for the SDXL
UNet in fp32); the format is simple enough to stream: a little-endian u64 header length, a JSON
header of dtypes, shapes and byte offsets, then the raw little-endian data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from sdxl_common.atomic import atomic_path
from sdxl_common.errors import InputError
from sdxl_common.progress import bar

_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
           np.dtype("int64"): "I64", np.dtype("int32"): "I32"}


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not match the expected layout."""


def write_safetensors(path: Path, layout: Sequence[Tuple[str, Tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], dtype=np.float32,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors named in `layout`, calling `produce(name)` for each in turn.

    The file appears at `path` only when complete (written to a temp file, then renamed).
    """
    dtype = np.dtype(dtype)
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape in layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, bar(total=len(layout), desc=f"writing {Path(path).name}",
                                       unit="tensor") as progress:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape in layout:
                progress.update(1)
                arr = np.asarray(produce(name), dtype=dtype.newbyteorder("<"), order="C")  # keeps 0-d
                if tuple(arr.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced shape {arr.shape}, layout says {shape}")
                f.write(arr.tobytes())


class SafetensorsFile:
    """Lazy reader: names and shapes from the header, tensors one at a time, read with plain
    file reads. Not memory-mapped: pages of a mapping stay resident while it is open, so a
    mapped full-size load peaked at 1.56x the weights (*measured*: 20.2 GiB for 12.9 GiB of
    sdxl-base weights); a read is copied once and its pages are the allocator's."""

    _NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "BF16": np.uint16, "U8": np.uint8, "I8": np.int8,
              "BOOL": np.bool_}

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        try:
            self._entries, self._base, self._meta = self._read_header()
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from None
        self.shapes = {k: tuple(v["shape"]) for k, v in self._entries.items()}

    def _read_header(self):
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length).decode("utf-8"))
        meta = header.pop("__metadata__", None) or {}
        base = 8 + length
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            if entry["dtype"] not in self._NUMPY:
                raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
            if base + end > size:
                raise ValueError(f"tensor {name!r} lies past the end of the file")
        return header, base, meta

    def get(self, name: str) -> np.ndarray:
        """The tensor `name`; a `CheckpointError` if it cannot be read or holds NaN/Inf."""
        try:
            entry = self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r}: no such tensor") from None
        start, end = entry["data_offsets"]
        dtype = np.dtype(self._NUMPY[entry["dtype"]]).newbyteorder("<")
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            arr = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize)
        if entry["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        arr = arr.reshape(entry["shape"])
        # one float64 sum finds NaN or Inf without a mask as large as the tensor; finite
        # float32/float16 values cannot overflow it
        if arr.dtype.kind == "f" and not np.isfinite(np.sum(arr, dtype=np.float64)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {bad} NaN/Inf values "
                                  "(the first such tensor read); the checkpoint is corrupt")
        return arr

    def metadata(self) -> Dict[str, str]:
        return dict(self._meta)
