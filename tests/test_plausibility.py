"""ds_train/data/plausibility.py: rows that load but are probably wrong are reported, on real audio files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from ds_train.data.manifest import read_manifest
from ds_train.data.plausibility import plausibility_warnings


def _clip(path, seconds, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 200 * t), rate)


@pytest.fixture
def manifest(tmp_path):
    _clip(tmp_path / "short.wav", 1.1)
    _clip(tmp_path / "long.wav", 6.0)
    rows = [
        {"audio": "long.wav", "text": "A sentence of about six seconds, spoken at a calm and even pace."},  # fine
        {"audio": "short.wav", "text": "x" * 2000},  # a transcript pasted on the wrong clip (passed before)
        {"audio": "long.wav", "text": "Hi"},  # 2 characters in 6 s
        {"audio": "long.wav", "text": "A sentence of about six seconds, spoken at a calm and even pace."},  # row 1 again
        {"audio": "missing.wav", "text": "gone"},  # a bad sample: validate reports it, not this module
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_far_from_its_audio_and_duplicates_are_named(manifest):
    warnings = plausibility_warnings(read_manifest(str(manifest)))
    assert [w["source"] for w in warnings] == ["m.jsonl:2", "m.jsonl:3", "m.jsonl:4"]
    assert warnings[0]["reason"].startswith("2000 characters of text for 1.1s of audio (1818.2 chars/s; speech is 1-40)")
    assert warnings[1]["reason"].startswith("2 characters of text for 6.0s of audio (0.3 chars/s")
    assert warnings[2]["reason"] == "duplicate of m.jsonl:1 (same text and audio)"


def test_plausibility_setting(manifest, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from conftest import base_config, write_config
    from ds_train.config import load_config
    from ds_train.data.prepare import prepare
    from ds_train.errors import ConfigError, DataError

    cfg = base_config(tiny_model, tmp_path, tmp_path / "out", data={"train_file": str(manifest),
                                                                    "plausibility": "error"})
    with pytest.raises(DataError, match=r"3 bad sample\(s\) in .*m.jsonl \(implausible rows"):
        prepare(load_config(str(write_config(tmp_path / "c.yaml", cfg))), str(manifest),
                AutoTokenizer.from_pretrained(str(tiny_model)))
    with pytest.raises(ConfigError, match="data.plausibility must be one of warn, error, off"):
        load_config(None, ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d",
                           "train.output_dir=/o", "data.plausibility=maybe"])
