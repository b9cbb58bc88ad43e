"""Where a clip's bytes are: a file, or a member of a file a data set keeps its audio in (data/formats/).

A member is named `CONTAINER::MEMBER`: `/data/emilia/shard-00003.tar::KEY.mp3` (a tar member of webdataset shards),
`/data/ds/train-00001.parquet::17/audio` or `/data/ds/data-00000-of-00001.arrow::17/audio` (row 17, 0-based, of
the column `audio` of a parquet file or of a `save_to_disk` Arrow file). Everything that reads audio (audio.py,
validate.py, the digest memo of cache.py) goes through here, so a member is read alone: the tar's headers are
scanned once per process (member data is skipped, not read), parquet reads one row group of one column, Arrow
files are memory-mapped. No corpus is ever extracted.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
from typing import Optional, Union

from ds_train.fsutil import file_digest

SEP = "::"
CONTAINERS = (".tar", ".parquet", ".arrow")


def member_ref(container: str, member: str) -> str:
    return f"{container}{SEP}{member}"


def split(ref: str) -> tuple[str, Optional[str]]:
    """(the file holding the clip, the member inside it or None for a clip that is a file of its own)."""
    container, sep, member = ref.rpartition(SEP)
    if sep and container.endswith(CONTAINERS):
        return container, member
    return ref, None


def real(ref: str) -> str:
    """The reference with its file's real path (symlinks resolved): how the digest memo knows a clip."""
    path, member = split(ref)
    path = os.path.realpath(path)
    return path if member is None else member_ref(path, member)


def holder(ref: str) -> str:
    """The file whose size and mtime stand for the clip's (the container of a member)."""
    return split(ref)[0]


def exists(ref: str) -> bool:
    path, member = split(ref)
    if not os.path.isfile(path):
        return False
    if member is None:
        return True
    try:
        read_bytes(ref)
    except (KeyError, IndexError, ValueError, OSError):
        return False
    return True


def open_clip(ref: str) -> Union[str, io.BytesIO]:
    """What soundfile reads: the path of a file, the bytes of a member."""
    return ref if split(ref)[1] is None else io.BytesIO(read_bytes(ref))


def digest(ref: str) -> str:
    """SHA-1 of the clip's bytes."""
    if split(ref)[1] is None:
        return file_digest(ref)
    return hashlib.sha1(read_bytes(ref)).hexdigest()


def read_bytes(ref: str) -> bytes:
    """The clip's bytes; KeyError/IndexError for a member its container does not hold, ValueError for an empty
    cell."""
    path, member = split(ref)
    if member is None:
        with open(path, "rb") as f:
            return f.read()
    st = os.stat(path)
    if path.endswith(".tar"):
        offset, size = _tar_index(path, st.st_size, st.st_mtime_ns)[member]
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    row, _, column = member.partition("/")
    return _cell_bytes(path, _cell(path, st.st_size, st.st_mtime_ns, int(row), column))


@functools.lru_cache(maxsize=64)
def _tar_index(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a tar, from its headers (tarfile seeks over member data)."""
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def _cell(path: str, size: int, mtime_ns: int, row: int, column: str):
    if path.endswith(".arrow"):
        table = _arrow_table(path, size, mtime_ns)
        if not 0 <= row < table.num_rows:
            raise IndexError(f"row {row} of {table.num_rows}")
        return table.column(column)[row].as_py()
    starts = _row_group_starts(path, size, mtime_ns)
    group = max(g for g, s in enumerate(starts) if s <= row)
    values = _row_group(path, size, mtime_ns, group, column)
    if not 0 <= row - starts[group] < len(values):
        raise IndexError(f"row {row} of {starts[group] + len(values)}")
    return values[row - starts[group]].as_py()


def _cell_bytes(path: str, value) -> bytes:
    """The bytes of an audio cell: HF's Audio struct {bytes, path} (bytes, or else the file at path, relative to the
    data set's file), or plain binary."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(os.path.join(os.path.dirname(path), value["path"]), "rb") as f:
                return f.read()
        raise ValueError("the audio cell holds neither bytes nor a path")
    if isinstance(value, bytes):
        return value
    raise ValueError(f"the audio cell is a {type(value).__name__}, not audio bytes")


@functools.lru_cache(maxsize=16)
def _arrow_table(path: str, size: int, mtime_ns: int):
    """A `save_to_disk` Arrow file, memory-mapped: reading a cell touches that cell's pages only."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str, size: int, mtime_ns: int) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    starts, n = [], 0
    for g in range(meta.num_row_groups):
        starts.append(n)
        n += meta.row_group(g).num_rows
    return starts


@functools.lru_cache(maxsize=2)  # records are read in order: the row group at hand (and one more) is enough
def _row_group(path: str, size: int, mtime_ns: int, group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)
