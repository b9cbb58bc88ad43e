"""webdataset tar shards as TTS rows: the Emilia / Emilia-YODAS layout, `KEY.mp3` (or .flac, .wav, .ogg) with
`KEY.json` ({"text", "speaker", "language", "duration", ...}) and/or `KEY.txt` (the text).

Samples are grouped as webdataset groups them (consecutive members with the same key, webdataset's `base_plus_ext`,
extensions lower-cased). Only the tar headers and the small text members are read: tarfile seeks over the audio,
which stays in the tar and is referenced as `SHARD.tar::KEY.mp3` (data/clips.py). `data.columns` maps TTS keys to
JSON keys; other JSON keys are metadata. A sample named `shard-00003.tar:17` is the 18th sample of that shard.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

from ds_train.data.clips import member_ref
from ds_train.data.formats import COLUMN_KEYS, Row
from ds_train.errors import DataError

AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")  # what soundfile decodes, in order of preference


def data_files(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if p.is_file():
        return [(p.name, str(p))]
    return [(f.name, str(f)) for f in sorted(p.glob("*.tar"))]


def rows(path: str, columns: dict) -> Iterator[Row]:
    start = 0
    for name, f in data_files(path):
        n = 0
        for n, (key, raw, error) in enumerate(_samples(os.path.abspath(f), columns), start=1):
            yield Row(f"{name}:{n - 1}", start + n - 1, raw, error)
        start += n


def _samples(f: str, columns: dict) -> Iterator[tuple[str, object, str | None]]:
    from webdataset.tariterators import base_plus_ext

    try:
        tar = tarfile.open(f, "r:")
    except tarfile.TarError as e:
        raise DataError([{"source": os.path.basename(f), "reason": f"not a tar file ({e})"}], f) from None
    with tar:
        group, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            key, ext = base_plus_ext(m.name)
            if key is None:
                continue
            if key != group and members:
                yield _sample(tar, f, group, members, columns)
                members = {}
            group, members[ext.lower()] = key, m
        if members:
            yield _sample(tar, f, group, members, columns)


def _sample(tar: tarfile.TarFile, f: str, key: str, members: dict, columns: dict) -> tuple[str, object, str | None]:
    audio = next((members[e] for e in AUDIO_EXTS if e in members), None)
    if audio is None:
        return key, key, f"{key}: no audio member ({', '.join(key + '.' + e for e in AUDIO_EXTS)}); has " \
                         f"{', '.join(sorted(members))}"
    raw = {}
    if "json" in members:
        text = tar.extractfile(members["json"]).read()
        try:
            meta = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return key, text, f"{members['json'].name}: invalid JSON: {e}"
        if not isinstance(meta, dict):
            return key, meta, f"{members['json'].name}: not a JSON object"
        by_column = {c: k for k, c in columns.items()}
        for c, v in meta.items():
            k = by_column.get(c, None if c in COLUMN_KEYS else c)  # an unmapped `text` is not the text
            if k is not None and v is not None:
                raw[k] = str(v) if k == "speaker" and isinstance(v, int) else v
    if "text" not in raw and "txt" in members:
        raw["text"] = tar.extractfile(members["txt"]).read().decode("utf-8").strip()
    if isinstance(raw.get("ref_audio"), str):  # a path relative to the shard's folder
        raw["ref_audio"] = os.path.join(os.path.dirname(f), raw["ref_audio"])
    raw["audio"] = member_ref(f, audio.name)
    raw.setdefault("key", key)
    return key, raw, None
