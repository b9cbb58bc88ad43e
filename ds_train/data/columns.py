"""A file of named numpy arrays plus a JSON header, read by memory-mapping: the prepared cache's shard format.

Layout (safetensors' idea): 8 bytes little-endian header length, the header (UTF-8 JSON: {"format", "meta", "arrays":
{name: [dtype, shape, offset]}}), then each array's bytes, 64-byte aligned. Not safetensors itself: its metadata holds
strings only and its reader copies each tensor or slice out of the file, where here an array is a numpy view of the
one mapping every process shares.
Reading parses the header and maps the file: no array is read until it is indexed, every process that maps the file
shares its pages, and nothing in the file can run code (no pickle).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ds_train.fsutil import replacing

FORMAT = "ds_train-columns-1"
ALIGN = 64


def write_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write `arrays` and `meta` to `path` atomically (readers see the whole file or the old one)."""
    layout, offset = {}, 0
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        layout[name] = [a.dtype.str, list(a.shape), offset]
        offset += -(-a.nbytes // ALIGN) * ALIGN
    header = json.dumps({"format": FORMAT, "meta": meta, "arrays": layout}).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with replacing(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for a in arrays.values():
            f.write(a.tobytes())
            f.write(b"\0" * (-a.nbytes % ALIGN))


def _header(f, path) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated (no header)")
    n = struct.unpack("<Q", raw)[0]
    header = json.loads(f.read(n))
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return header, 8 + n


def read_meta(path: Path) -> dict:
    """The header's `meta` alone (no array is mapped)."""
    with open(path, "rb") as f:
        return _header(f, path)[0]["meta"]


def read_arrays(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {name: read-only memory-mapped array})."""
    with open(path, "rb") as f:
        header, start = _header(f, path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if Path(path).stat().st_size > start else None
    out = {}
    for name, (dtype, shape, offset) in header["arrays"].items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        if count == 0 or data is None:
            out[name] = np.zeros(shape, dt)
            continue
        out[name] = data[start + offset:start + offset + count * dt.itemsize].view(dt).reshape(shape)
    return header["meta"], out
