"""An LJSpeech-style folder as TTS rows: `metadata.csv` with `ID|transcription|normalized transcription` per line (the
normalized text is trained when present: it spells out what is spoken, "Chapter one" for "Chapter 1"), and the clips
in `wavs/ID.wav`. Rows are named by line, `metadata.csv:12`; a line that is not `ID|text[|text]` is a bad record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ds_train.data.formats import Row


def metadata_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_file() else p / "metadata.csv"


def rows(path: str) -> Iterator[Row]:
    meta = metadata_path(path)
    wavs = meta.resolve().parent / "wavs"
    with open(meta, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source, fields = f"{meta.name}:{n}", line.split("|")
        if len(fields) < 2 or not fields[0].strip():
            yield Row(source, n, line, "expected ID|transcription|normalized transcription")
            continue
        utt = fields[0].strip()
        text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
        yield Row(source, n, {"audio": str(wavs / f"{utt}.wav"), "text": text.strip(), "id": utt})
