"""A Hugging Face dataset as TTS rows: a `save_to_disk` folder (state.json + memory-mapped Arrow files) or parquet
files (what `Dataset.to_parquet` and the Hub's `refs/convert/parquet` hold), read with pyarrow.

`data.columns` maps TTS keys to columns (default: the same names). The audio column (and a reference audio column)
may be HF's `Audio` struct {bytes, path}, raw bytes, or a path string; a cell holding bytes is referenced in place
(`FILE::ROW/COLUMN`, data/clips.py), and reading the rows reads no audio: only the other columns are read. A speaker
given as a number (LibriTTS-R's `speaker_id`) is taken as its decimal string. Other columns with plain values (text,
numbers) are kept as metadata; a null optional column is as if absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from ds_train.data.clips import member_ref
from ds_train.data.formats import COLUMN_KEYS, Row
from ds_train.errors import ConfigError

BATCH = 4096  # rows per Arrow batch read from a file


def data_files(path: str) -> list[tuple[str, str]]:
    """(name, path) of the Arrow or parquet files of the dataset at `path`, in record order."""
    p = Path(path)
    if p.is_file():
        return [(p.name, str(p))]
    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise ConfigError(f"{path} is a DatasetDict: name one split's folder, e.g. {p / (splits or ['train'])[0]}")
    if (p / "state.json").is_file():
        state = json.loads((p / "state.json").read_text())
        if state.get("_indices_data_files"):
            raise ConfigError(f"{path} was saved with an indices mapping (a select/shuffle not flattened): save it "
                             "again after `ds = ds.flatten_indices()`")
        return [(f["filename"], str(p / f["filename"])) for f in state["_data_files"]]
    files = sorted(p.rglob("*.parquet"), key=lambda f: str(f.relative_to(p)))
    return [(str(f.relative_to(p)), str(f)) for f in files]


def rows(path: str, columns: dict) -> Iterator[Row]:
    start = 0
    for name, f in data_files(path):
        n = 0
        for n, raw in enumerate(_file_rows(f, name, columns), start=1):
            yield Row(f"{name}:{n - 1}", start + n - 1, raw)
        start += n


def _file_rows(f: str, name: str, columns: dict) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if f.endswith(".arrow"):
        table = pa.ipc.open_stream(pa.memory_map(f)).read_all()
        schema = table.schema
    else:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
    for key in ("audio", "text"):
        if columns[key] not in schema.names:
            raise ConfigError(f"{name} has no column '{columns[key]}' for the {key} (its columns: "
                             f"{', '.join(schema.names)}); name it with data.columns.{key}")
    blobs = {field.name for field in schema if _is_blob(field.type)}  # audio bytes: referenced, never read here
    read = [c for c in schema.names if c not in blobs]
    batches = (table.select(read).to_batches(BATCH) if f.endswith(".arrow")
               else pf.iter_batches(batch_size=BATCH, columns=read))
    directory, row = os.path.dirname(os.path.abspath(f)), 0
    by_column = {c: k for k, c in columns.items()}
    for batch in batches:
        for values in batch.to_pylist():
            raw = {}
            for key in ("audio", "ref_audio"):
                c = columns[key]
                if c in blobs:
                    raw[key] = member_ref(os.path.abspath(f), f"{row}/{c}")
                elif values.get(c) is not None:
                    raw[key] = values[c] if not isinstance(values[c], str) else os.path.join(directory, values[c])
            for c, v in values.items():
                key = by_column.get(c, None if c in COLUMN_KEYS else c)  # an unmapped `text` is not the text
                if key in (None, "audio", "ref_audio") or v is None or not isinstance(v, (str, int, float, bool)):
                    continue
                raw[key] = str(v) if key == "speaker" and isinstance(v, int) else v
            if "ref_audio" in raw and "ref_text" not in raw and columns["ref_audio"] in blobs:
                del raw["ref_audio"]  # no reference text: the row has no reference (a null pair)
            yield raw
            row += 1


def _is_blob(t) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(_is_blob(t.field(i).type) for i in range(t.num_fields))
