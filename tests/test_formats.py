"""ds_train.data.formats and clips: a Hugging Face dataset (save_to_disk and parquet), webdataset tar shards and an
LJSpeech folder, each built here with its real library (datasets, webdataset.TarWriter, a plain folder), prepare to
the codes and labels their JSONL twin prepares to; bad records are named by shard/row/line; a relaunch reads no
audio; and a 2-rank run mixes a tar data set with a JSONL manifest, with an eval split."""

from __future__ import annotations

import builtins
import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import base_config, launch, loss_records, write_config
from ds_train.data import clips
from ds_train.data.cache import CachedDataset, default_cache_dir
from ds_train.data.manifest import read_manifest
from ds_train.data.prepare import prepare
from ds_train.demo.data import RATE, synth
from ds_train.errors import ConfigError, DataError
from test_prepare import make_cfg, new_process

N = 4  # rows of each data set: the first 4 demo training rows (3 speakers, each with a reference clip)


def demo_rows(demo_data) -> list[dict]:
    rows = [json.loads(line) for line in (demo_data / "train.jsonl").read_text().splitlines()[:N]]
    return [{k: str(demo_data / v) if k in ("audio", "ref_audio") else v for k, v in r.items()} for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_hf(rows, disk_dir, parquet_dir, **renamed):
    """The rows as an HF dataset with Audio columns: save_to_disk in 2 Arrow files, and 2 parquet files."""
    from datasets import Audio, Dataset, load_from_disk

    columns = {renamed.get(k, k): [r[k] for r in rows] for k in rows[0]}
    ds = Dataset.from_dict(columns).cast_column(renamed.get("audio", "audio"), Audio())
    if "ref_audio" in rows[0]:
        ds = ds.cast_column(renamed.get("ref_audio", "ref_audio"), Audio())
    ds.save_to_disk(str(disk_dir), num_shards=2)
    ds = load_from_disk(str(disk_dir))  # the audio bytes embedded, as in the Hub's parquet files (to_parquet alone
    parquet_dir.mkdir(parents=True)     # keeps the paths of local files)
    for i in range(2):
        ds.shard(2, i, contiguous=True).to_parquet(str(parquet_dir / f"train-{i:05d}-of-00002.parquet"))


def write_tars(rows, out_dir, per_shard=2):
    """The rows as Emilia-style webdataset shards: KEY.wav + KEY.json, `per_shard` samples a shard."""
    import webdataset as wds

    out_dir.mkdir(parents=True)
    for s in range(0, len(rows), per_shard):
        with wds.TarWriter(str(out_dir / f"shard-{s // per_shard:05d}.tar")) as tar:
            for r in rows[s:s + per_shard]:
                key = os.path.basename(r["audio"]).rsplit(".", 1)[0]
                meta = {k: v for k, v in r.items() if k != "audio"}
                with open(r["audio"], "rb") as f:
                    tar.write({"__key__": key, "wav": f.read(), "json": meta})


def write_ljspeech(rows, out_dir):
    (out_dir / "wavs").mkdir(parents=True)
    lines = []
    for r in rows:
        utt = os.path.basename(r["audio"]).rsplit(".", 1)[0]
        (out_dir / "wavs" / f"{utt}.wav").write_bytes(open(r["audio"], "rb").read())
        lines.append(f"{utt}|{r['text'].upper()}|{r['text']}")  # the normalized (3rd) column is what is spoken
    (out_dir / "metadata.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sets(demo_data, tmp_path_factory):
    """{name: (data set path, its JSONL twin)}; each twin holds the same rows with the same audio files."""
    root = tmp_path_factory.mktemp("formats")
    rows = demo_rows(demo_data)
    full = write_jsonl(root / "full.jsonl", rows)
    plain = write_jsonl(root / "plain.jsonl", [{"audio": r["audio"], "text": r["text"]} for r in rows])
    write_hf(rows, root / "hf_disk", root / "hf_parquet")
    write_tars(rows, root / "wds")
    write_ljspeech(rows, root / "ljs")
    return {"hf_disk": (root / "hf_disk", full), "hf_parquet": (root / "hf_parquet", full),
            "webdataset": (root / "wds", full), "ljspeech": (root / "ljs", plain)}


SOURCES = {
    "hf_disk": ["data-00000-of-00002.arrow:0", "data-00000-of-00002.arrow:1", "data-00001-of-00002.arrow:0",
                "data-00001-of-00002.arrow:1"],
    "hf_parquet": ["train-00000-of-00002.parquet:0", "train-00000-of-00002.parquet:1",
                   "train-00001-of-00002.parquet:0", "train-00001-of-00002.parquet:1"],
    "webdataset": ["shard-00000.tar:0", "shard-00000.tar:1", "shard-00001.tar:0", "shard-00001.tar:1"],
    "ljspeech": [f"metadata.csv:{n}" for n in range(1, N + 1)],
}


@pytest.fixture(scope="module")
def prepared(sets, tiny_model, text_tok, audio_tok, tmp_path_factory):
    """Each data set and JSONL twin prepared into its default cache (next to it); a cache shard spans the data set's
    files."""
    out = tmp_path_factory.mktemp("formats_out")
    cfg = make_cfg(tiny_model, out / "cfg")
    results = {}
    for path in {p for pair in sets.values() for p in pair}:
        results[path] = prepare(cfg, str(path), text_tok, audio_tokenizer=audio_tok)
    return results


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_each_format_prepares_the_codes_and_labels_of_its_jsonl_twin(name, sets, prepared, model_config):
    path, twin = sets[name]
    assert prepared[path].cache_dir == default_cache_dir(str(path)) and prepared[path].bad == []
    got, want = CachedDataset(prepared[path].cache_dir, model_config), CachedDataset(prepared[twin].cache_dir,
                                                                                    model_config)
    assert got.sources() == SOURCES[name] and len(want) == N  # FILE:ROW across the files of the data set
    for a, b in zip(got.entries, want.entries):
        for k in ("input_ids", "label_ids", "audio_codes", "audio_starts"):
            assert torch.equal(a[k], b[k]), (a["source"], k)
        assert a["clip_seconds"] == pytest.approx(b["clip_seconds"])
    # The audio is read in place, as members of the data set's files (nothing extracted); a tar sample's reference
    # clip is the file its JSON names.
    members = [[clips.split(p)[1] is not None for p in e["audio_paths"]] for e in got.entries]
    assert members == [{"ljspeech": [False], "webdataset": [False, True]}.get(name, [True, True])] * N


def test_the_form_of_a_data_set_is_told_by_its_path(sets, tmp_path):
    from ds_train.data.formats import kind_of

    kinds = {name: kind_of(str(sets[name][0])) for name in SOURCES}
    assert kinds == {"hf_disk": "hf", "hf_parquet": "hf", "webdataset": "webdataset", "ljspeech": "ljspeech"}
    assert kind_of(str(next(sets["webdataset"][0].glob("*.tar")))) == "webdataset"
    assert kind_of(str(sets["ljspeech"][1])) == "json"
    assert kind_of(str(tmp_path), "webdataset") == "webdataset"  # data.format names it: not looked at
    with pytest.raises(ConfigError, match=r"not a data set ds_train reads: no state.json .*metadata.csv"):
        kind_of(str(tmp_path))


def test_columns_are_configurable_and_speakers_may_be_numbers(sets, tmp_path):
    from ds_train.data.manifest import speakers_by_source

    src = [json.loads(line) for line in sets["hf_disk"][1].read_text().splitlines()]
    for i, r in enumerate(src):
        r["speaker"] = 100 + i % 2  # LibriTTS-R's speaker_id is an integer
    write_hf(src, tmp_path / "disk", tmp_path / "pq", audio="wav", text="normalized_text", speaker="speaker_id")
    columns = {"audio": "wav", "text": "normalized_text", "speaker": "speaker_id"}
    recs = read_manifest(str(tmp_path / "pq"), columns=columns)
    assert [r.error for r in recs] == [None] * N
    assert [r.sample.speaker for r in recs] == ["100", "101", "100", "101"]
    assert speakers_by_source(str(tmp_path / "disk"), columns=columns) == {
        s: str(100 + i % 2) for i, s in enumerate(SOURCES["hf_disk"])}
    with pytest.raises(ConfigError, match=r"has no column 'text' for the text .*data.columns.text"):
        read_manifest(str(tmp_path / "pq"), columns={"audio": "wav"})


def test_eval_prompts_from_a_data_set_send_member_clips_to_the_serve_engine_as_bytes(sets, tiny_model, text_tok,
                                                                                    audio_tok):
    """eval.samples speaks held-out records through Boson's serve engine, which opens reference clips by path or
    takes their bytes (raw_audio): a reference inside a parquet row goes as its bytes and conditions on the codes
    of the JSONL twin's file."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from ds_train.data.audio import load_audio
    from ds_train.generate import prompts_from_manifest, serve_engine

    path, twin = sets["hf_parquet"]
    got, want = (prompts_from_manifest(str(p), "auto", "sys", 2) for p in (path, twin))
    assert [p.text for p in got] == [p.text for p in want] and len(got) == 2
    engine = serve_engine(HiggsAudioModel.from_pretrained(str(tiny_model)).eval(), text_tok, audio_tok)
    for a, b in zip(got, want):
        ref = [c for m in a.sample.messages for c in (m.content if isinstance(m.content, list) else [m.content])
               if hasattr(c, "raw_audio")][0]
        assert ref.audio_url == "" and ref.raw_audio and clips.split(a.ref_audio)[1] == f"{got.index(a)}/ref_audio"
        codes = [engine._prepare_inputs(p.sample, force_audio_gen=True)["audio_out_ids"] for p in (a, b)]
        assert torch.equal(codes[0], codes[1]) and codes[0].shape[1] > 10
        assert np.array_equal(load_audio(a.target_audio, 16000), load_audio(b.target_audio, 16000))


def write_bad_sets(d):
    """A tar, a parquet file and an LJSpeech folder, each with good and bad records; (path, expected report)."""
    import webdataset as wds
    from datasets import Audio, Dataset

    def wav(x):
        buf = io.BytesIO()
        sf.write(buf, x, RATE, format="WAV")
        return buf.getvalue()

    good, silent = wav(synth("hello there", 150.0)), wav(np.zeros(RATE // 2, np.float32))
    (d / "wds").mkdir(parents=True)
    with wds.TarWriter(str(d / "wds" / "bad-00000.tar")) as tar:
        tar.write({"__key__": "a", "wav": good, "json": {"text": "hello there"}})
        tar.write({"__key__": "b", "wav": silent, "json": {"text": "quiet"}})
        tar.write({"__key__": "c", "wav": good, "json": b"{not json"})
        tar.write({"__key__": "d", "txt": "no audio here"})
        tar.write({"__key__": "e", "flac": b"garbage bytes", "txt": "garbled"})
    tar_bad = [("bad-00000.tar:1", f"audio is silent (peak 0.0e+00 < 1e-04): {d / 'wds' / 'bad-00000.tar'}::b.wav"),
               ("bad-00000.tar:2", "c.json: invalid JSON"),
               ("bad-00000.tar:3", "d: no audio member (d.flac, d.wav, d.mp3, d.ogg); has txt"),
               ("bad-00000.tar:4", "cannot read audio header")]
    ds = Dataset.from_dict({"audio": [{"bytes": good, "path": "a.wav"}, {"bytes": silent, "path": "b.wav"},
                                      {"bytes": good, "path": "c.wav"}],
                            "text": ["hello there", "quiet", "  "]}).cast_column("audio", Audio())
    (d / "pq").mkdir()
    ds.to_parquet(str(d / "pq" / "train-00000-of-00001.parquet"))
    pq_bad = [("train-00000-of-00001.parquet:1", "::1/audio"), ("train-00000-of-00001.parquet:2", "empty text")]
    (d / "ljs" / "wavs").mkdir(parents=True)
    (d / "ljs" / "wavs" / "LJ1.wav").write_bytes(good)
    (d / "ljs" / "metadata.csv").write_text("LJ1|Hello there.|hello there\nLJ2|Gone.|gone\njust a line\n")
    lj_bad = [("metadata.csv:2", f"audio file not found: {d / 'ljs' / 'wavs' / 'LJ2.wav'}"),
              ("metadata.csv:3", "expected ID|transcription|normalized transcription")]
    return {"webdataset": (d / "wds", tar_bad), "hf": (d / "pq", pq_bad), "ljspeech": (d / "ljs", lj_bad)}


def test_bad_records_are_named_by_shard_row_and_line_and_skip_bad_counts_them(tiny_model, text_tok, audio_tok,
                                                                               model_config, tmp_path):
    for name, (path, expected) in write_bad_sets(tmp_path / "sets").items():
        strict = make_cfg(tiny_model, tmp_path / f"strict-{name}")
        with pytest.raises(DataError) as err:  # one report before any encoding
            prepare(strict, str(path), text_tok, str(tmp_path / f"c-{name}"), audio_tokenizer="must not be used")
        assert [b["source"] for b in err.value.bad] == [s for s, _ in expected], name
        for b, (_, reason) in zip(err.value.bad, expected):
            assert reason in b["reason"], (name, b)
        result = prepare(make_cfg(tiny_model, tmp_path / f"skip-{name}", skip_bad=True), str(path), text_tok,
                         str(tmp_path / f"c-{name}"), audio_tokenizer=audio_tok)
        assert (result.num_samples, len(result.bad)) == (1, len(expected)), name
        assert [b["source"] for b in result.bad] == [s for s, _ in expected]
        assert len(CachedDataset(result.cache_dir, model_config)) == 1


def count_data_reads(monkeypatch) -> list[str]:
    """Every read of a data set's file from now on (names): by Python (tar headers, members, digests), pyarrow
    (memory maps, parquet files) or libsndfile (audio)."""
    import pyarrow
    import pyarrow.parquet

    opened, exts = [], (".tar", ".parquet", ".arrow", ".wav")
    real_open, real_sf, real_map = builtins.open, sf.SoundFile.__init__, pyarrow.memory_map
    real_pq = pyarrow.parquet.ParquetFile.__init__

    def note(file):
        name = str(getattr(file, "name", file))
        if name.endswith(exts):
            opened.append(os.path.basename(name))

    def counting_open(file, *a, **kw):
        note(file)
        return real_open(file, *a, **kw)

    def counting_sf(self, file, *a, **kw):
        note(file)
        return real_sf(self, file, *a, **kw)

    def counting_map(path, *a, **kw):
        note(path)
        return real_map(path, *a, **kw)

    def counting_pq(self, source, *a, **kw):
        note(source)
        return real_pq(self, source, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(sf.SoundFile, "__init__", counting_sf)
    monkeypatch.setattr(pyarrow, "memory_map", counting_map)
    monkeypatch.setattr(pyarrow.parquet.ParquetFile, "__init__", counting_pq)
    monkeypatch.setattr(tarfile.TarFile, "__init__", _counting(tarfile.TarFile.__init__, note))
    return opened


def _counting(init, note):
    def counting(self, name=None, *a, **kw):
        note(name if name is not None else kw.get("fileobj"))
        return init(self, name, *a, **kw)
    return counting


def fresh_process():
    """What a relaunch starts with: no digest, tar index or parquet row group remembered in memory."""
    new_process()
    for memo in (clips._tar_index, clips._arrow_table, clips._row_group_starts, clips._row_group):
        memo.cache_clear()


@pytest.mark.parametrize("name", ["webdataset", "hf_parquet", "hf_disk", "ljspeech"])
def test_a_relaunch_reads_no_audio_and_a_touched_shard_is_reread_alone(name, sets, prepared, tiny_model, text_tok,
                                                                       monkeypatch, tmp_path):
    path = sets[name][0]
    cfg = make_cfg(tiny_model, tmp_path / "cfg")  # the settings `prepared` used
    opened = count_data_reads(monkeypatch)
    fresh_process()
    again = prepare(cfg, str(path), text_tok, audio_tokenizer="must not be used")
    assert (again.encoded_shards, again.num_samples, opened) == (0, N, [])  # stat calls only
    if name == "ljspeech":
        return  # its clips are files, as a JSONL manifest's (test_prepare covers those)
    files = sorted(p for p in os.listdir(path) if p.endswith((".tar", ".parquet", ".arrow")))
    touched = os.path.join(path, files[-1])
    os.utime(touched, ns=(os.stat(touched).st_atime_ns, os.stat(touched).st_mtime_ns + 1))  # same bytes, new mtime
    read_bytes, members = clips.read_bytes, []
    monkeypatch.setattr(clips, "read_bytes", lambda ref: members.append(ref) or read_bytes(ref))
    fresh_process()
    moved = prepare(cfg, str(path), text_tok, audio_tokenizer="must not be used")
    assert (moved.encoded_shards, moved.num_samples) == (0, N)  # keys are by content: nothing to encode
    # The rows of every file are read (text and headers), the audio of the touched file only (hashed once more).
    assert set(opened) == set(files)
    assert members and {clips.split(m)[0] for m in members} == {touched}
    assert len(set(members)) == (2 if name == "webdataset" else 4)  # its 2 rows' clips (and their references)
    fresh_process()
    opened.clear()
    assert prepare(cfg, str(path), text_tok, audio_tokenizer="unused").encoded_shards == 0 and opened == []


@pytest.mark.slow
def test_a_tar_data_set_trains_mixed_with_a_jsonl_manifest_and_an_eval_split(sets, prepared, tiny_model, demo_data,
                                                                            tmp_path):
    """2 ranks: data.train_files = the demo JSONL (8 rows) and the webdataset shards (4 rows) at weight 2, with
    data.eval_split holding out speakers of each; the tar set's cache from `prepared` is reused as it is."""
    wds_dir = sets["webdataset"][0]
    out = tmp_path / "run"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 2, "epochs": 9},
                      data={"train_file": None, "eval_split": 0.25,
                            "train_files": [str(demo_data / "train.jsonl"), {"path": str(wds_dir), "weight": 2}]})
    proc = launch(["train", str(write_config(tmp_path / "run.yaml", cfg))])
    report = json.loads((out / "data_report.json").read_text())
    mix = {os.path.basename(r["manifest"]): r for r in report["train_mix"]}
    assert mix["wds"]["weight"] == 2 and mix["wds"]["held_out"] >= 1
    assert mix["wds"]["per_epoch"] == 2 * mix["wds"]["samples"] == 2 * (N - mix["wds"]["held_out"])
    assert mix["train.jsonl"]["samples"] + mix["train.jsonl"]["held_out"] == 8
    assert "wds: " in proc.stdout and "speaker(s)" in proc.stdout
    assert f"prepare {wds_dir}: cache {default_cache_dir(str(wds_dir))} is current" in proc.stdout
    losses = loss_records(out)
    assert sorted(losses) == [1, 2] and all(np.isfinite(r["loss"]) for r in losses.values())
