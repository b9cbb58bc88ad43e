"""Durable, atomic file writes: a reader (or a resumed run after a crash) sees the old content or the new, never a
torn file or a half-built directory. And releasing the pages of memory-mapped checkpoint files already read."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is flushed and renamed over `path`, on error
    removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staged_dir(out_dir: Path, replace: Callable[[Path], bool]) -> Iterator[Path]:
    """Build OUT_DIR's content in a hidden sibling and move it into place only when complete: on error nothing is
    left behind. An existing non-empty OUT_DIR is replaced only when `replace(OUT_DIR)` says it is ours."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not replace(out_dir))):
        raise FileExistsError(f"{out_dir} exists and is not an earlier output of this command; "
                              "remove it or choose another output dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync(p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_digest(path: str) -> str:
    """SHA-1 of a file's bytes, remembered for the process while its size and mtime stay."""
    st = os.stat(path)
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    """Bytes in the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def is_no_space(e: BaseException) -> bool:
    """A write that failed because the disk is full (torch's zip writer says only 'iostream error')."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return is_no_space_text(str(e))


def is_no_space_text(text: str) -> bool:
    """is_no_space for an error already turned into text (the message of another rank's failure)."""
    return "No space left" in text or "Disk quota exceeded" in text or "basic_ios::clear" in text \
        or "unexpected pos" in text


def is_write_failure(e: BaseException) -> bool:
    """A write the filesystem refused (full, quota, I/O error, permissions, a vanished dir), as opposed to a bug:
    OSError, or the RuntimeError torch's zip writer raises for any of them."""
    if isinstance(e, OSError) or is_no_space(e):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("PytorchStreamWriter failed" in text or "file write failed" in text)


MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(tensors) -> None:
    """Release the pages of tensors loaded with torch.load(mmap=True) that have been read. torch maps the file
    private and nothing writes to it, so a released page is read from the file again if touched again; without this
    every page read stays in the process's resident memory (streaming a 23 GB fp32 checkpoint would end up holding it
    all, as file-backed RSS the kernel may reclaim but a cgroup's limit counts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    for t in tensors:
        storage = t.untyped_storage()
        start = storage.data_ptr()
        lo, hi = -(-start // page) * page, (start + storage.nbytes()) // page * page
        if hi > lo:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
