"""The forms a training data set comes in, each read into the same rows a TTS manifest has.

- `json`: a JSONL / JSON-list manifest of ChatML samples or TTS rows (read by data/manifest.py).
- `hf`: a Hugging Face dataset: a `save_to_disk` folder (state.json + Arrow files), parquet files (a folder of them,
  searched recursively, or one file) with an audio column (HF's `Audio` struct of bytes/path, raw bytes, or a path
  string) and a text column (hf.py).
- `webdataset`: tar shards (a folder of `*.tar`, or one), a sample being `KEY.flac|wav|mp3|ogg` with `KEY.json` and/or
  `KEY.txt`: the Emilia layout (webdataset.py).
- `ljspeech`: a folder with `metadata.csv` (`ID|text|normalized text`) and `wavs/ID.wav` (ljspeech.py).

A row of a data set's file is named `FILE:N` (`shard-00003.tar:17`, `train-00001.parquet:17`, 0-based, as `ds[17]`;
`metadata.csv:12`, a line) and numbered across the data set's files in the order of their names, the order the cache
keeps (`order`). Audio inside a tar or a parquet/Arrow row is referenced in place (data/clips.py), never extracted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ds_train.config import COLUMN_KEYS
from ds_train.errors import ConfigError
from ds_train.fsutil import file_digest


@dataclass
class Row:
    source: str  # "shard-00003.tar:17": what reports name the record by
    order: int  # the record's number across the data set (record order; FILE:N is order - the file's first)
    raw: object  # a TTS row (dict), or what failed to parse
    error: Optional[str] = None


def kind_of(path: str, fmt: str = "auto") -> str:
    """json | hf | webdataset | ljspeech: `data.format` when it names a data set form, else what `path` is."""
    if fmt in ("hf", "webdataset", "ljspeech"):
        return fmt
    p = Path(path)
    if fmt in ("chatml", "tts") or p.is_file() and p.suffix not in (".tar", ".parquet", ".arrow", ".csv"):
        return "json"
    if p.is_file():
        return {".tar": "webdataset", ".parquet": "hf", ".arrow": "hf", ".csv": "ljspeech"}[p.suffix]
    if not p.is_dir():
        raise FileNotFoundError(f"manifest not found: {path}")
    if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
        return "hf"
    if (p / "metadata.csv").is_file():
        return "ljspeech"
    if any(p.glob("*.tar")):
        return "webdataset"
    if any(p.rglob("*.parquet")):
        return "hf"
    raise ConfigError(f"{path}: a folder, but not a data set ds_train reads: no state.json (HF save_to_disk), "
                     "metadata.csv (LJSpeech), *.tar (webdataset) or *.parquet (HF) in it")


def exists(path: str) -> bool:
    return os.path.isfile(path) or os.path.isdir(path)


def rows(path: str, kind: str, columns: Optional[dict] = None) -> Iterator[Row]:
    """The rows of a data set of form `kind` (not json: data/manifest.py reads those), in record order."""
    columns = {**{k: k for k in COLUMN_KEYS}, **(columns or {})}
    if kind == "hf":
        from ds_train.data.formats import hf
        return hf.rows(path, columns)
    if kind == "webdataset":
        from ds_train.data.formats import webdataset
        return webdataset.rows(path, columns)
    if kind == "ljspeech":
        from ds_train.data.formats import ljspeech
        return ljspeech.rows(path)
    raise ValueError(f"no row reader for {kind!r}")


def source_digest(path: str, kind: str, columns: Optional[dict] = None) -> str:
    """What makes a prepared cache current for this input without reading audio: the bytes of a manifest (or of
    LJSpeech's metadata.csv); for tar and parquet/Arrow files, which hold the audio, each file's name, size and mtime
    (a stat each), the bytes of the dataset's small JSON files, and data.columns."""
    if kind == "json":
        return file_digest(path)
    if kind == "ljspeech":
        from ds_train.data.formats.ljspeech import metadata_path
        return file_digest(str(metadata_path(path)))
    files = data_files(path, kind)
    listing = []
    for name, f in files:
        st = os.stat(f)
        listing.append([name, st.st_size, st.st_mtime_ns])
    small = [[p.name, file_digest(str(p))] for p in sorted(Path(path).glob("*.json"))] if os.path.isdir(path) else []
    return hashlib.sha1(json.dumps({"files": listing, "json": small, "columns": columns or {}},
                                   sort_keys=True).encode()).hexdigest()


def data_files(path: str, kind: str) -> list[tuple[str, str]]:
    """(name, path) of each file of a tar or HF data set, in record order."""
    if kind == "hf":
        from ds_train.data.formats.hf import data_files as files
    else:
        from ds_train.data.formats.webdataset import data_files as files
    return files(path)
