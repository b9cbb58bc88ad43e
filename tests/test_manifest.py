"""ds_train.data.manifest: both input formats, the voice-cloning layout, line numbers of bad records, record keys."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import soundfile as sf
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message

from ds_train.data.manifest import audio_contents, read_manifest, text_of, to_dict, tts_to_chatml

SYSTEM = "Generate audio following instruction."


def _wav(path, seconds=0.2, rate=16000, value=0.1):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(int(seconds * rate), value, dtype=np.float32), rate)
    return path


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_tts_row_becomes_boson_voice_cloning_layout(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    rows = [{"audio": "a/x.wav", "text": "hello there", "speaker": "alto", "ref_audio": "/abs/ref.wav",
             "ref_text": "a reference"},
            {"audio": "y.wav", "text": "no reference"}]
    recs = read_manifest(str(_jsonl(d / "m.jsonl", rows)), system_prompt=SYSTEM)

    cloned = recs[0].sample
    assert [m.role for m in cloned.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert cloned.messages[0].content == SYSTEM
    assert cloned.messages[1].content == "a reference"
    assert cloned.messages[2].content == AudioContent(audio_url="/abs/ref.wav")  # absolute paths are kept
    assert cloned.messages[3].content == "hello there"
    assert cloned.messages[4].content == AudioContent(audio_url=str(d / "a" / "x.wav"))  # relative: manifest's dir
    assert cloned.start_index == 4  # only the final assistant turn (target audio) is trained
    assert cloned.speaker == "alto"

    plain = recs[1].sample
    assert [m.role for m in plain.messages] == ["system", "user", "assistant"]
    assert plain.start_index == 2 and plain.speaker is None
    assert [r.error for r in recs] == [None, None]

    no_system = tts_to_chatml({"audio": "/y.wav", "text": "t"}, system_prompt="")
    assert [m.role for m in no_system.messages] == ["user", "assistant"] and no_system.start_index == 1


def test_chatml_jsonl_and_json_list_give_the_same_samples_and_lines(tmp_path):
    samples = [
        {"messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "say it"},
                      {"role": "assistant", "content": {"type": "audio", "audio_url": "a.wav"}}],
         "start_index": 2, "speaker": "s1"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "listen"},
                                                    {"type": "audio", "audio_url": "b.wav"}]},
                      {"role": "assistant", "content": "ok"}]},
    ]
    jsonl = read_manifest(str(_jsonl(tmp_path / "c.jsonl", ["", *samples])))  # a blank first line still counts
    (tmp_path / "c.json").write_text(json.dumps(samples, indent=2))
    listed = read_manifest(str(tmp_path / "c.json"))

    assert [r.source for r in jsonl] == ["c.jsonl:2", "c.jsonl:3"]
    text = (tmp_path / "c.json").read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(text) if line == "  {"]
    assert [r.source for r in listed] == [f"c.json:{n}" for n in starts] and len(starts) == 2
    for a, b in zip(jsonl, listed):
        assert a.error is None and b.error is None
        assert to_dict(a.sample) == to_dict(b.sample)
        assert a.key == b.key
    s0, s1 = jsonl[0].sample, jsonl[1].sample
    assert isinstance(s0, ChatMLSample) and s0.start_index == 2 and s0.speaker == "s1"
    assert [c.audio_url for c in audio_contents(s1)] == [str(tmp_path / "b.wav")]
    assert text_of(s1) == ["listen", "ok"]


BAD_ROWS = [
    ({"audio": "a.wav", "text": "fine"}, None),
    ('{"audio": "a.wav", "text": ', "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"audio": "a.wav", "text": "x", "language": 7}, "'language' must be a string, got int"),
    ({"audio": "a.wav"}, "'text' must be a string"),
    ({"audio": "a.wav", "text": "x", "speaker": 7}, "'speaker' must be a string"),
    ({"audio": "a.wav", "text": "x", "ref_audio": "r.wav"}, "'ref_audio' and 'ref_text' go together"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user", "content": "x"}], "id": 3}, "does not fit the schema"),
    ({"messages": [{"role": "assistant", "content": {"type": "audio", "audio_url": "a.wav", "raw_audio": "AAA"}}]},
     "inline raw_audio is not supported"),
    ({"wav": "a.wav", "txt": "x"}, "neither a ChatML sample"),
]


def test_every_bad_record_is_named_by_file_and_line(tmp_path):
    recs = read_manifest(str(_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])))
    assert [r.source for r in recs] == [f"bad.jsonl:{i}" for i in range(1, len(BAD_ROWS) + 1)]
    for rec, (_, expected) in zip(recs, BAD_ROWS):
        if expected is None:
            assert rec.error is None and rec.sample is not None
        else:
            assert rec.sample is None and expected in rec.error, (rec.source, rec.error)
    assert len({r.key for r in recs}) == len(recs)


def test_unparseable_json_list_is_one_record_at_the_failing_line(tmp_path):
    (tmp_path / "l.json").write_text('[\n  {"audio": "a.wav", "text": "x"},\n  {"audio": }\n]\n')
    recs = read_manifest(str(tmp_path / "l.json"))
    assert len(recs) == 1 and recs[0].source == "l.json:3" and "invalid JSON" in recs[0].error


def test_format_can_be_forced(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "x"},
                                      {"messages": [{"role": "user", "content": "x"}]}])
    as_tts = read_manifest(str(m), fmt="tts")
    as_chatml = read_manifest(str(m), fmt="chatml")
    assert as_tts[0].error is None and "'audio' must be a string" in as_tts[1].error
    assert "does not fit the schema" in as_chatml[0].error and as_chatml[1].error is None


def test_missing_manifest_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(str(tmp_path / "nope.jsonl"))


def test_key_follows_content_and_audio_file_not_manifest_location(tmp_path):
    wav = _wav(tmp_path / "audio" / "x.wav")
    rel = read_manifest(str(_jsonl(tmp_path / "rel.jsonl", [{"audio": "audio/x.wav", "text": "t"}])))[0]
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    absolute = read_manifest(str(_jsonl(other_dir / "abs.jsonl", [{"audio": str(wav), "text": "t"}])))[0]
    assert rel.key == absolute.key  # same sample, same file: shared work

    new_text = read_manifest(str(_jsonl(tmp_path / "t.jsonl", [{"audio": str(wav), "text": "other"}])))[0]
    assert new_text.key != rel.key

    time.sleep(0.01)
    _wav(wav, seconds=0.3)  # the same name, a new recording
    os.utime(wav, ns=(time.time_ns(), time.time_ns()))
    rerecorded = read_manifest(str(tmp_path / "rel.jsonl"))[0]
    assert rerecorded.key != rel.key
    assert read_manifest(str(tmp_path / "rel.jsonl"))[0].key == rerecorded.key  # and stable while unchanged


def test_messages_keep_boson_types():
    s = tts_to_chatml({"audio": "/a.wav", "text": "t", "ref_audio": "/r.wav", "ref_text": "r"}, SYSTEM)
    assert all(isinstance(m, Message) for m in s.messages)
    assert [type(c).__name__ for c in audio_contents(s)] == ["AudioContent", "AudioContent"]


def test_tts_rows_keep_extra_keys_as_metadata(tmp_path):
    # Real manifests carry more than the keys ds_train reads; before issue 11 any extra key rejected the row.
    row = {"audio": "a.wav", "text": "x", "speaker": "s1", "language": "de", "duration": 1.25, "id": "utt-7",
           "emotion": "calm"}
    rec = read_manifest(str(_jsonl(tmp_path / "m.jsonl", [row])))[0]
    assert rec.error is None
    assert rec.sample.speaker == "s1"
    assert rec.sample.misc == {"language": "de", "duration": 1.25, "id": "utt-7", "emotion": "calm"}
    assert text_of(rec.sample)[-1] == "x"  # metadata is not text the model sees
