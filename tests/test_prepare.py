"""ds_train.data.prepare end to end on real files: every class of bad input in one report, skip_bad with its report,
cache reuse and invalidation, a 2-process prepare equal to a 1-process one with the work shared below the shard, and
runs on one cache that never encode a shard twice (locks: held, waited for, taken over from a dead run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, base_config, launch, write_config
from ds_train.config import load_config
from ds_train.data.cache import CachedDataset, fingerprint, lock_path, write_piece
from ds_train.data.columns import read_arrays
from ds_train.data.manifest import read_manifest
from ds_train.demo.data import RATE, synth
from ds_train.data.prepare import LOCK_LEASE_S, encode_clip, encode_record, prepare, shard_lease, write_report
from ds_train.errors import EXIT_DATA, CacheMismatchError, DataError


def make_cfg(model, out, **data):
    """A Config; data.train_file is not read (tests hand prepare() the manifest)."""
    d = base_config(model, model, out, data={"train_file": "unused.jsonl", **data})
    return load_config(str(write_config(out.parent / f"{out.name}.yaml", d)))


def write_bad_set(d):
    """Audio files of every bad kind, and a manifest that uses them, with the (line, reason) prepare must give."""
    a = d / "audio"
    a.mkdir(parents=True)
    sf.write(a / "good.wav", synth("hello world", 150.0), RATE)
    sf.write(a / "good2.wav", synth("another line", 110.0), RATE)
    sf.write(a / "ref.wav", synth("a reference", 180.0), RATE)
    whole = (a / "good.wav").read_bytes()
    (a / "trunc.wav").write_bytes(whole[: len(whole) // 2])  # libsndfile reads this as a shorter clip
    (a / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    sf.write(a / "zero.wav", np.zeros(0, np.float32), RATE)
    sf.write(a / "silent.wav", np.zeros(RATE // 2, np.float32), RATE)
    sf.write(a / "low.wav", synth("hello", 150.0)[::6], 4000)
    sf.write(a / "long.wav", np.tile(synth("hello world", 150.0), 5), RATE)  # ~2.8 s > max_audio_seconds=2
    nan = synth("hello", 150.0)
    nan[100] = np.nan
    sf.write(a / "nan.wav", nan, RATE, subtype="FLOAT")
    sf.write(a / "whole.flac", synth("hello world", 150.0), RATE)
    flac = (a / "whole.flac").read_bytes()
    (a / "trunc.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(a / "short.wav", synth("hi", 150.0)[: int(0.02 * RATE)], RATE)

    def tts(audio, text="hello world", **kw):
        return json.dumps({"audio": f"audio/{audio}", "text": text, **kw})

    asr = {"messages": [{"role": "user", "content": [{"type": "text", "text": "write down what you hear"},
                                                     {"type": "audio", "audio_url": "audio/good.wav"}]},
                        {"role": "assistant", "content": "hello world"}], "start_index": 1}
    masked = {"messages": [{"role": "user", "content": "say it"},
                           {"role": "assistant", "content": {"type": "audio", "audio_url": "audio/good.wav"}}],
              "start_index": 5}
    lines = [
        (tts("good.wav", ref_audio="audio/ref.wav", ref_text="a reference"), None),
        (tts("missing.wav"), f"audio file not found: {a / 'missing.wav'}"),
        (tts("trunc.wav"), "truncated WAV: its header promises"),
        (tts("garbage.wav"), "cannot read audio header"),
        (tts("zero.wav"), "audio has zero length"),
        (tts("silent.wav"), f"audio is silent (peak 0.0e+00 < 1e-04): {a / 'silent.wav'}"),
        (tts("low.wav"), "sample rate 4000 Hz is below the 8000 Hz the audio tokenizer can take"),
        (tts("long.wav"), "longer than data.max_audio_seconds=2.0"),
        (tts("good.wav", text="  "), "empty text"),
        (tts("good.wav", ref_audio="audio/silent.wav", ref_text="ref"), f"audio is silent (peak 0.0e+00 < 1e-04): "
                                                                         f"{a / 'silent.wav'}"),
        ('{"audio": "audio/good.wav", "text": "unterminated', "invalid JSON"),
        (json.dumps({"audio": "audio/good.wav"}), "does not fit the schema: 'text' must be a string"),
        (tts("nan.wav"), "audio contains NaN or infinite samples"),
        (json.dumps(asr), None),  # trains text only: kept, and reported as training no audio
        (json.dumps(masked), "nothing to train on: every label is masked"),
        (tts("good2.wav", text="another line"), None),
        (tts("trunc.flac"), "cannot decode audio"),
        (tts("short.wav"), "shorter than data.min_audio_seconds=0.05"),
    ]
    (d / "mixed.jsonl").write_text("".join(line + "\n" for line, _ in lines))
    expected = [(f"mixed.jsonl:{n}", reason) for n, (_, reason) in enumerate(lines, start=1) if reason]
    good = [f"mixed.jsonl:{n}" for n, (_, reason) in enumerate(lines, start=1) if not reason]
    return d / "mixed.jsonl", expected, good


def assert_report(bad, expected):
    assert [b["source"] for b in bad] == [src for src, _ in expected]  # every bad sample, in manifest order
    for b, (src, reason) in zip(bad, expected):
        assert reason in b["reason"], (src, b["reason"], reason)


def test_every_bad_sample_is_in_one_report_before_any_encoding(tiny_model, text_tok, tmp_path):
    manifest, expected, _ = write_bad_set(tmp_path / "set")
    cfg = make_cfg(tiny_model, tmp_path / "out", max_audio_seconds=2.0)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer="must not be used")
    assert len(expected) == 15
    assert_report(err.value.bad, expected)
    message = str(err.value)
    assert message.startswith(f"15 bad sample(s) in {manifest}:")
    for src, _ in expected:
        assert f"\n  {src}: " in message
    assert "data.skip_bad=true" in message
    assert sorted(p.name for p in cache.iterdir()) == ["fingerprint.json"]  # nothing encoded, nothing half-written


def test_loudness_normalize_rejects_clips_it_cannot_measure(tiny_model, text_tok, tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    sf.write(tmp_path / "a.wav", synth("hi there", 150.0)[: int(0.3 * RATE)], RATE)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "hi"}) + "\n")
    cfg = make_cfg(tiny_model, tmp_path / "out", loudness_normalize=True)
    with pytest.raises(DataError) as err:  # pyloudnorm would raise mid-encoding on a clip under 0.4 s
        prepare(cfg, str(tmp_path / "m.jsonl"), text_tok, str(tmp_path / "cache"))
    assert_report(err.value.bad, [("m.jsonl:1", "too short for data.loudness_normalize (needs > 0.4s)")])


def test_skip_bad_trains_on_the_rest_and_logs_the_count(tiny_model, text_tok, audio_tok, model_config, tmp_path,
                                                        capsys):
    manifest, expected, good = write_bad_set(tmp_path / "set")
    out = tmp_path / "out"
    cfg = make_cfg(tiny_model, out, skip_bad=True, max_audio_seconds=2.0)
    result = prepare(cfg, str(manifest), text_tok, str(tmp_path / "cache"), audio_tokenizer=audio_tok)
    assert result.num_samples == 3 and result.no_trainable_audio == ["mixed.jsonl:14"]
    assert_report(result.bad, expected)
    write_report(out, [result])  # what `ds-train prepare` and `ds-train train` call on rank 0
    logged = capsys.readouterr().out
    assert f"data: skipped 15 bad sample(s) (data.skip_bad=true); see {out}/data_report.json" in logged
    assert "data: 1 sample(s) train no audio (text loss only), e.g. mixed.jsonl:14" in logged

    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == 15 and report["samples"] == {str(tmp_path / "cache"): 3}
    assert_report(report["bad"], expected)
    assert {b["manifest"] for b in report["bad"]} == {str(manifest)}
    assert report["no_trainable_audio"] == ["mixed.jsonl:14"]

    ds = CachedDataset(tmp_path / "cache", model_config)
    assert [e["source"] for e in ds.entries] == good  # no dummy stands in for a skipped sample
    for e in ds.entries:
        assert e["audio_codes"].shape[0] == 8 and e["audio_codes"].shape[1] > 10
        assert (e["label_ids"] >= 0).any()
    assert [e["trains_audio"] for e in ds.entries] == [True, False, True]


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def short_set(d, n, pitch=140.0):
    """n TTS rows without references, each with its own short clip (quick to encode): (manifest, rows)."""
    (d / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        sf.write(d / "audio" / f"{i}.wav", synth(word[:5], pitch + 10 * i), RATE)
        rows.append({"audio": f"audio/{i}.wav", "text": word if i < len(WORDS) else f"{word} {i}"})
    return write_rows(d / "train.jsonl", rows), rows


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def entries(cache, model_config):
    return CachedDataset(cache, model_config).entries


def assert_same_entry(a, b):
    for k in ("input_ids", "label_ids", "audio_codes", "audio_starts"):
        assert torch.equal(a[k], b[k]), (a["source"], k)
    for k in ("source", "key", "audio_paths", "trains_audio"):
        assert a[k] == b[k], (a["source"], k)


def assert_same_cache(a, b):
    """Caches `a` and `b` hold the same files (no lock or piece left), index and shards, tensor for tensor."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    assert np.array_equal(np.load(a / "samples.npy"), np.load(b / "samples.npy"))
    for path in sorted(a.glob("shard-*.dsc")):
        (x, xa), (y, ya) = read_arrays(path), read_arrays(b / path.name)
        assert x == y, path.name  # fingerprint, keys, bad samples, sources, keys and paths of the entries
        assert xa.keys() == ya.keys() and all(np.array_equal(xa[k], ya[k]) for k in xa), path.name


def test_rerun_reuses_current_shards_and_refuses_a_changed_fingerprint(tiny_model, text_tok, audio_tok,
                                                                      model_config, tmp_path):
    manifest, rows = short_set(tmp_path / "set", 4)
    cfg = make_cfg(tiny_model, tmp_path / "out", shard_size=2)
    cache = tmp_path / "cache"
    first = prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok)
    assert (first.num_samples, first.encoded_shards) == (4, 2)
    before = entries(cache, model_config)

    again = prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer="must not be used")
    assert (again.num_samples, again.encoded_shards) == (4, 0)

    rows[3]["text"] = "a changed line"  # shard 1 only
    write_rows(manifest, rows)
    assert prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok).encoded_shards == 1
    after = entries(cache, model_config)
    for i in (0, 1, 2):
        assert_same_entry(before[i], after[i])
    assert not torch.equal(before[3]["input_ids"], after[3]["input_ids"])

    # A re-recorded file under the same name is new input, not a cache hit.
    sf.write(tmp_path / "set" / "audio" / "0.wav", synth("something longer", 120.0), RATE)
    assert prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok).encoded_shards == 1
    rerecorded = entries(cache, model_config)
    assert rerecorded[0]["audio_codes"].shape[1] > 2 * before[0]["audio_codes"].shape[1]
    assert_same_entry(after[1], rerecorded[1])

    changed = make_cfg(tiny_model, tmp_path / "out", shard_size=2, loudness_normalize=True)
    with pytest.raises(CacheMismatchError, match=f"cache {cache} was made with a different "
                                                 r"settings.loudness_normalize \(False then, True now\)"):
        prepare(changed, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok)
    # An interrupted run leaves shards but no index: the fingerprint written first still guards them.
    (cache / "index.json").unlink()
    with pytest.raises(CacheMismatchError, match="settings.loudness_normalize"):
        prepare(changed, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok)
    assert prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer="unused").encoded_shards == 0

    write_rows(manifest, rows[:2])  # the manifest shrank by a shard: its file goes, the index counts what is left
    assert prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer="unused").num_samples == 2
    assert sorted(p.name for p in cache.glob("shard-*.dsc")) == ["shard-00000.dsc"]


def test_repaired_input_is_encoded_on_the_next_run(tiny_model, text_tok, audio_tok, model_config, tmp_path):
    manifest, rows = short_set(tmp_path / "set", 3)
    late = tmp_path / "set" / "audio" / "2.wav"
    late.rename(tmp_path / "2.wav")  # delivered later
    write_rows(manifest, [rows[0], '{"audio": "audio/1.wav", "text": "bravo"', rows[2]])
    cfg = make_cfg(tiny_model, tmp_path / "out", skip_bad=True)
    cache = str(tmp_path / "cache")
    first = prepare(cfg, str(manifest), text_tok, cache, audio_tokenizer=audio_tok)
    assert first.num_samples == 1 and [b["source"] for b in first.bad] == ["train.jsonl:2", "train.jsonl:3"]

    write_rows(manifest, rows)  # the broken line, repaired in place
    assert prepare(cfg, str(manifest), text_tok, cache, audio_tokenizer=audio_tok).num_samples == 2
    (tmp_path / "2.wav").rename(late)  # the manifest line is unchanged; its file now exists
    last = prepare(cfg, str(manifest), text_tok, cache, audio_tokenizer=audio_tok)
    assert (last.num_samples, last.bad, last.encoded_shards) == (3, [], 1)
    assert [e["source"] for e in entries(cache, model_config)] == [f"train.jsonl:{n}" for n in (1, 2, 3)]


@pytest.mark.slow
def test_two_process_prepare_equals_one_process(tiny_model, text_tok, audio_tok, model_config, tmp_path):
    d = tmp_path / "set"
    manifest, rows = short_set(d, 5)
    sf.write(d / "audio" / "silent.wav", np.zeros(RATE // 4, np.float32), RATE)
    rows.insert(1, {"audio": "audio/silent.wav", "text": "quiet"})
    rows.insert(5, '{"audio": broken')
    rows.append({"audio": "audio/missing.wav", "text": "gone"})
    # 8 lines in shards of 5. Each rank checks 4 lines: bad ones on both (2; 6 and 8). Both ranks lock a shard and
    # encode a contiguous part of the 5 good records, so shard 0 is assembled from pieces of both ranks.
    write_rows(manifest, rows)

    single = make_cfg(tiny_model, tmp_path / "out1", shard_size=5, skip_bad=True)
    one = prepare(single, str(manifest), text_tok, str(tmp_path / "cache1"), audio_tokenizer=audio_tok)
    assert (one.encoded_shards, one.encoded_samples) == (2, [5])

    out2 = tmp_path / "out2"
    cfg2 = base_config(tiny_model, d, out2, data={"train_file": str(manifest), "shard_size": 5, "skip_bad": False,
                                                  "cache_dir": str(tmp_path / "cache2")})
    # Without skip_bad every rank stops with the whole report, also the rank whose own shards are clean; rank 0
    # alone prints it (one message per failure), and the exit code is the data error's.
    failed = launch(["prepare", str(write_config(tmp_path / "fail.yaml", cfg2))], nprocs=2, check=False)
    logs = failed.stdout + failed.stderr
    assert failed.returncode == EXIT_DATA == 3, logs[-3000:]  # every rank stops with the report: a data error
    assert logs.count(f"ds-train prepare: 3 bad sample(s) in {manifest}:\n  train.jsonl:2: audio is silent") == 1
    assert logs.count("\n  train.jsonl:6: invalid JSON") == 1 and logs.count("\n  train.jsonl:8: audio file not") == 1
    assert not list((tmp_path / "cache2").glob("shard-*"))

    cfg2["data"]["skip_bad"] = True
    proc = launch(["prepare", str(write_config(tmp_path / "cfg2.yaml", cfg2))], nprocs=2)
    assert proc.stdout.count("data: skipped 3 bad sample(s)") == 1, proc.stdout[-3000:]  # rank 0 alone reports
    assert proc.stdout.count("prepare: encoded 5 sample(s) into 2 shard(s) in ") == 1
    assert "s; per rank: 2, 3\n" in proc.stdout  # lines 1, 3 | 4, 5 (shard 0) and 7 (shard 1)

    index = json.loads((tmp_path / "cache2" / "index.json").read_text())
    assert index["num_shards"] == 2 and index["num_samples"] == 5 == one.num_samples
    assert [b["source"] for b in one.bad] == ["train.jsonl:2", "train.jsonl:6", "train.jsonl:8"]
    assert index["bad"] == one.bad  # the same report in manifest order, though two ranks found its parts
    report = json.loads((out2 / "data_report.json").read_text())
    assert report["skipped"] == 3 and [b["source"] for b in report["bad"]] == [b["source"] for b in one.bad]
    a, b = entries(tmp_path / "cache1", model_config), entries(tmp_path / "cache2", model_config)
    assert [e["source"] for e in a] == ["train.jsonl:1", "train.jsonl:3", "train.jsonl:4", "train.jsonl:5",
                                        "train.jsonl:7"]
    assert len(b) == len(a)
    assert_same_cache(tmp_path / "cache1", tmp_path / "cache2")


def test_a_moved_data_set_and_tokenizer_keep_their_cache(tiny_model, text_tok, audio_tok, tmp_path):
    """The same bytes under other paths with other mtimes (a plain `cp -r` to another disk): the cache stays valid,
    nothing is re-encoded. Before, the fingerprint held the tokenizer's absolute path and mtime, and record keys the
    files' mtimes: CacheMismatchError, then hours of re-encoding on real data."""
    import shutil

    manifest, _ = short_set(tmp_path / "set", 4)
    cfg = make_cfg(tiny_model, tmp_path / "out", shard_size=2)
    cache = tmp_path / "cache"
    assert prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok).encoded_shards == 2

    moved_set = tmp_path / "disk2" / "set"
    shutil.copytree(tmp_path / "set", moved_set, copy_function=shutil.copyfile)  # new paths, new mtimes
    moved_model = tmp_path / "disk2" / "model"
    shutil.copytree(tiny_model, moved_model, copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns(".*"))  # without the weights' digest memo: it is recomputed
    moved_cfg = make_cfg(moved_model, tmp_path / "out2", shard_size=2)
    again = prepare(moved_cfg, str(moved_set / manifest.name), text_tok, str(cache), audio_tokenizer="must not be used")
    assert (again.num_samples, again.encoded_shards) == (4, 0)

    # The content still decides: other weights under the same name are another tokenizer.
    weights = moved_model / "audio_tokenizer" / "model.pth"
    state = torch.load(weights, weights_only=False)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0
    torch.save(state, weights)
    with pytest.raises(CacheMismatchError, match="audio_tokenizer.weights_sha1"):
        prepare(moved_cfg, str(moved_set / manifest.name), text_tok, str(cache), audio_tokenizer=audio_tok)


def test_prepared_codes_are_the_codes_the_serve_engine_conditions_on(tiny_model, demo_data, text_tok, audio_tok):
    """A reference clip (22.05 kHz, resampled to the tokenizer's 16 kHz) encodes to the same codes in `prepare` as
    in HiggsAudioServeEngine._prepare_inputs, which loads it with librosa: training conditions on what inference
    will. (With torchaudio's resampler 0.8-1.4% of the codes of 2 of the 3 demo voices differed.)"""
    import librosa
    from boson_multimodal.data_types import ChatMLSample
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    from ds_train.data.audio import load_audio
    from ds_train.generate import serve_engine
    from ds_train.data.manifest import voice_cloning_prompt
    from ds_train.data.prepare import encode_clip

    engine = serve_engine(HiggsAudioModel.from_pretrained(str(tiny_model)).eval(), text_tok, audio_tok)
    refs = sorted((demo_data / "audio").glob("ref_*.wav"))
    assert len(refs) == 3 and sf.info(refs[0]).samplerate == RATE != audio_tok.sampling_rate
    for ref in refs:
        served, _ = librosa.load(ref, sr=audio_tok.sampling_rate)
        assert np.array_equal(load_audio(ref, audio_tok.sampling_rate), served)
        sample = ChatMLSample(messages=voice_cloning_prompt("the text", "sys", "the reference", str(ref)))
        inputs = engine._prepare_inputs(sample, force_audio_gen=True)
        served_codes = revert_delay_pattern(inputs["audio_out_ids"])[:, 1:-1]  # stream BOS/EOS off
        prepared = encode_clip(str(ref), audio_tok, loudness_normalize=False).long()
        assert prepared.shape[1] > 20 and torch.equal(served_codes, prepared)


def test_duration_limits_apply_at_load_without_encoding_again(tiny_model, text_tok, audio_tok, model_config,
                                                             tmp_path):
    # Before issue 11 the limits were part of the cache fingerprint: changing one re-encoded everything.
    manifest, rows = short_set(tmp_path / "set", 4)
    longest = 2
    clip, rate = sf.read(str(tmp_path / "set" / rows[longest]["audio"]))
    sf.write(tmp_path / "set" / rows[longest]["audio"], np.tile(clip, 2), rate)
    seconds = [sf.info(str(tmp_path / "set" / r["audio"])).duration for r in rows]
    limit = round(max(s for i, s in enumerate(seconds) if i != longest) + 0.01, 3)  # only the longest is over it
    assert seconds[longest] > limit
    cache = tmp_path / "cache"
    wide, narrow = (make_cfg(tiny_model, tmp_path / f"o{i}", shard_size=2, skip_bad=True, max_audio_seconds=m)
                    for i, m in enumerate((30.0, limit)))
    assert prepare(wide, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok).encoded_shards == 2

    result = prepare(narrow, str(manifest), text_tok, str(cache), audio_tokenizer="must not be used")
    assert (result.encoded_shards, result.num_samples) == (0, 3)
    assert [b["source"] for b in result.bad] == [f"train.jsonl:{longest + 1}"]
    assert f"longer than data.max_audio_seconds={limit}" in result.bad[0]["reason"]
    assert [e["source"] for e in entries(cache, model_config)] == [f"train.jsonl:{i + 1}" for i in range(4)
                                                                   if i != longest]
    strict = make_cfg(tiny_model, tmp_path / "o3", shard_size=2, max_audio_seconds=limit)
    with pytest.raises(DataError, match=f"train.jsonl:{longest + 1}: audio is"):
        prepare(strict, str(manifest), text_tok, str(cache), audio_tokenizer="must not be used")

    back = prepare(wide, str(manifest), text_tok, str(cache), audio_tokenizer="must not be used")
    assert (back.encoded_shards, back.num_samples, back.bad) == (0, 4, [])

    # A cache first made under the narrow limit never encoded the long clip: widening encodes its shard only.
    cache2 = tmp_path / "cache2"
    assert prepare(narrow, str(manifest), text_tok, str(cache2), audio_tokenizer=audio_tok).num_samples == 3
    widened = prepare(wide, str(manifest), text_tok, str(cache2), audio_tokenizer=audio_tok)
    assert (widened.encoded_shards, widened.num_samples) == (1, 4)


@pytest.mark.slow
def test_two_ranks_share_a_set_smaller_than_one_shard(tiny_model, text_tok, audio_tok, tmp_path):
    """Issue 11: a set smaller than one 256-sample shard (26 samples there) was encoded by rank 0 alone while rank 1
    sat idle. Now each rank encodes half, and the shard is the one a single process writes."""
    manifest, _ = short_set(tmp_path / "set", 12)
    one = prepare(make_cfg(tiny_model, tmp_path / "out1"), str(manifest), text_tok, str(tmp_path / "cache1"),
                  audio_tokenizer=audio_tok)
    assert (one.num_samples, one.encoded_shards, one.encoded_samples) == (12, 1, [12])

    cfg = base_config(tiny_model, tmp_path / "set", tmp_path / "out2", data={"cache_dir": str(tmp_path / "cache2")})
    proc = launch(["prepare", str(write_config(tmp_path / "two.yaml", cfg))], nprocs=2)
    assert proc.stdout.count("prepare: encoded 12 sample(s) into 1 shard(s) in ") == 1, proc.stdout[-3000:]
    assert "s; per rank: 6, 6\n" in proc.stdout
    assert_same_cache(tmp_path / "cache1", tmp_path / "cache2")


def run_counts(output: str) -> tuple[int, int]:
    """(samples, shards) one `ds-train prepare` run encoded, from its printed lines."""
    samples = re.search(r"prepare: encoded (\d+) sample\(s\) into (\d+) shard\(s\)", output)
    return (int(samples[1]), int(samples[2])) if samples else (0, 0)


def test_two_runs_on_one_cache_encode_each_shard_once(tiny_model, text_tok, audio_tok, tmp_path):
    """Two independent `ds-train prepare` jobs started together on one cache: every shard is encoded by one of them
    (the other skips it while its lock is held and takes it as written), and the cache is the one a single run
    makes."""
    manifest, _ = short_set(tmp_path / "set", 4)
    prepare(make_cfg(tiny_model, tmp_path / "ref", shard_size=1), str(manifest), text_tok, str(tmp_path / "ref_cache"),
            audio_tokenizer=audio_tok)
    runs = []
    for n in (1, 2):
        cfg = base_config(tiny_model, tmp_path / "set", tmp_path / f"out{n}",
                          data={"cache_dir": str(tmp_path / "cache"), "shard_size": 1})
        runs.append(subprocess.Popen([sys.executable, "-m", "ds_train", "prepare",
                                      str(write_config(tmp_path / f"run{n}.yaml", cfg))],
                                     cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(outputs)
    counts = [run_counts(out) for out in outputs]
    print(counts, *outputs, sep="\n")  # which run encoded what: it varies with the start-up race
    assert [sum(c) for c in zip(*counts)] == [4, 4], counts  # 4 samples in 4 shards, each encoded once in all
    assert_same_cache(tmp_path / "ref_cache", tmp_path / "cache")


def test_a_shard_another_run_holds_is_waited_for_not_encoded(tiny_model, text_tok, audio_tok, tmp_path, capsys):
    """Another run (here a thread of this process: a live holder) holds shard 0's lock for 3 s, then writes the
    shard. prepare encodes shard 1, says what it waits for and on which lock file, and takes shard 0 as written."""
    manifest, _ = short_set(tmp_path / "set", 4)
    cfg = make_cfg(tiny_model, tmp_path / "out", shard_size=2)
    ref, cache = tmp_path / "ref", tmp_path / "cache"
    prepare(cfg, str(manifest), text_tok, str(ref), audio_tokenizer=audio_tok)
    cache.mkdir()
    locked = threading.Event()

    def other_run():  # holds shard 0's lock for 3 s, then writes the shard (atomically) and lets go
        lease = shard_lease(cache, 0)
        with lease:
            locked.set()
            time.sleep(3)
            shutil.copy(ref / "shard-00000.dsc", cache / ".incoming")
            os.replace(cache / ".incoming", cache / "shard-00000.dsc")

    holder = threading.Thread(target=other_run)
    holder.start()
    assert locked.wait(30)
    other = shard_lease(cache, 0).owner
    result = prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok)
    holder.join()
    logged = capsys.readouterr().out
    assert (result.encoded_shards, result.encoded_samples, result.num_samples) == (1, [2], 4)  # shard 1 only
    assert (f"prepare: waiting for shard 0, which another run is encoding (pid {other.pid} on "
            f"{other.hostname}; lock {lock_path(cache, 0)}; 0s so far)") in logged
    assert "prepare: encoded 2 sample(s) into 1 shard(s) in " in logged
    assert "per rank: 2; 1 shard(s) written by another run\n" in logged
    assert_same_cache(ref, cache)


def test_a_dead_runs_lock_is_taken_over_and_its_pieces_reused(tiny_model, text_tok, audio_tok, tmp_path, capsys):
    """A run killed while encoding shard 0 left its lock (its process is gone) and a piece with record 1 in it: the
    next run takes the lock over at once, says so, and encodes only the 3 records no piece holds."""
    import functools

    manifest, _ = short_set(tmp_path / "set", 4)
    cfg = make_cfg(tiny_model, tmp_path / "out", shard_size=2)
    ref, cache = tmp_path / "ref", tmp_path / "cache"
    prepare(cfg, str(manifest), text_tok, str(ref), audio_tokenizer=audio_tok)
    cache.mkdir()
    lock = lock_path(cache, 0)
    hold_and_die = (f"import os; from filelock import SoftFileLease; lease = SoftFileLease({str(lock)!r}, "
                    f"lease_duration={LOCK_LEASE_S}); lease.acquire(); os._exit(0)")  # no release: as if killed
    subprocess.run([sys.executable, "-c", hold_and_die], check=True)
    dead = shard_lease(cache, 0).owner
    assert dead.pid != os.getpid() and lock.is_file()
    first = read_manifest(str(manifest), cfg.data.format, cfg.data.system_prompt)[0]
    codes_of = functools.partial(encode_clip, audio_tokenizer=audio_tok, loudness_normalize=False)
    write_piece(cache, 0, fingerprint(cfg, text_tok, cfg.model.audio_tokenizer_path),
                [(0, first.key, encode_record(first, text_tok, codes_of), None)])

    result = prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok)
    assert (result.encoded_shards, result.encoded_samples, result.num_samples) == (2, [3], 4)
    assert capsys.readouterr().out.count(f"prepare: took over the lock {lock} of pid {dead.pid} on "
                                         f"{dead.hostname} (gone, or silent for 300s)\n") == 1
    assert_same_cache(ref, cache)  # the lock and the piece are gone


def test_a_crash_while_encoding_leaves_no_lock_and_no_shard(tiny_model, text_tok, tmp_path):
    manifest, _ = short_set(tmp_path / "set", 2)
    cache = tmp_path / "cache"
    try:
        prepare(make_cfg(tiny_model, tmp_path / "out"), str(manifest), text_tok, str(cache),
                audio_tokenizer="not an audio tokenizer")  # the encoder fails on its first clip
        raise AssertionError("prepare did not fail")
    except AttributeError as crash:
        # Looked at while the failed call's frames (and lock objects) live, as in a multi-rank job, which leaves by
        # os._exit: only prepare's own clean-up releases the lock. (pytest.raises would drop the frames first.)
        assert "sampling_rate" in str(crash)
        left = sorted(p.name for p in cache.iterdir())
    assert left == ["fingerprint.json"]  # no lock, no piece, no half-written shard


def count_audio_opens(monkeypatch) -> list[str]:
    """Every open of a .wav file from now on (names): by Python (hashing) or by libsndfile (headers,
    decoding: soundfile.SoundFile, under librosa and soundfile.info too)."""
    import builtins

    opened = []
    real_open, real_sf = builtins.open, sf.SoundFile.__init__

    def counting_open(file, *a, **kw):
        if str(file).endswith(".wav"):
            opened.append(os.path.basename(str(file)))
        return real_open(file, *a, **kw)

    def counting_sf(self, file, *a, **kw):
        if str(file).endswith(".wav"):
            opened.append(os.path.basename(str(file)))
        return real_sf(self, file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(sf.SoundFile, "__init__", counting_sf)
    return opened


def new_process():
    """What a relaunch starts with: no digest remembered in memory (fsutil's per-process memo)."""
    from ds_train.fsutil import _digest

    _digest.cache_clear()


def test_relaunch_opens_no_audio_and_a_moved_set_is_hashed_once(tiny_model, text_tok, audio_tok, tmp_path,
                                                                 monkeypatch):
    """A relaunch (new process, same manifest bytes) opens no audio file; a changed row re-opens only the clips of
    its shard; a data set moved elsewhere is hashed once (new paths) and encodes nothing; after that a changed
    manifest opens nothing it already knows."""
    manifest, rows = short_set(tmp_path / "set", 4)
    cfg = make_cfg(tiny_model, tmp_path / "out", shard_size=2)
    cache = str(tmp_path / "cache")
    prepare(cfg, str(manifest), text_tok, cache, audio_tokenizer=audio_tok)
    opened = count_audio_opens(monkeypatch)

    new_process()
    assert prepare(cfg, str(manifest), text_tok, cache, audio_tokenizer="must not be used").encoded_shards == 0
    assert opened == []

    rows[3]["text"] = "a changed line"  # shard 1 (records 2, 3): checked and encoded again; shard 0 is not opened
    write_rows(manifest, rows)
    new_process()
    assert prepare(cfg, str(manifest), text_tok, cache, audio_tokenizer=audio_tok).encoded_shards == 1
    assert sorted(set(opened)) == ["2.wav", "3.wav"]

    opened.clear()
    moved = tmp_path / "elsewhere"
    (tmp_path / "set").rename(moved)  # new paths, same bytes: the manifest is current as it is
    new_process()
    result = prepare(cfg, str(moved / "train.jsonl"), text_tok, cache, audio_tokenizer="must not be used")
    assert (result.encoded_shards, result.num_samples, opened) == (0, 4, [])

    write_rows(moved / "train.jsonl", rows + [""])  # other bytes (a blank line), the same records: keys are read
    new_process()
    assert prepare(cfg, str(moved / "train.jsonl"), text_tok, cache, audio_tokenizer="unused").encoded_shards == 0
    assert sorted(opened) == ["0.wav", "1.wav", "2.wav", "3.wav"]  # each hashed once (new paths), no header read

    opened.clear()
    write_rows(moved / "train.jsonl", rows + ["", ""])
    new_process()
    assert prepare(cfg, str(moved / "train.jsonl"), text_tok, cache, audio_tokenizer="unused").encoded_shards == 0
    assert opened == []  # the digests of the new paths are remembered


def test_a_pickled_cache_of_an_older_version_is_named_and_rebuilt(tiny_model, text_tok, audio_tok, model_config,
                                                                  tmp_path, capsys):
    """A cache of version 5 (torch.save shards: pickle) is never unpickled: opening it says in one line what to
    do; prepare says it rebuilds it, removes the pickled shards and encodes the records again."""
    manifest, _ = short_set(tmp_path / "set", 2)
    cfg = make_cfg(tiny_model, tmp_path / "out")
    cache = tmp_path / "cache"
    fp = fingerprint(cfg, text_tok, cfg.model.audio_tokenizer_path)
    cache.mkdir()
    (cache / "fingerprint.json").write_text(json.dumps({**fp, "version": 5}))
    torch.save({"entries": []}, cache / "shard-00000.pt")
    (cache / "index.json").write_text(json.dumps({"fingerprint": {**fp, "version": 5}, "num_shards": 1}))
    with pytest.raises(FileNotFoundError, match=r"old pickled format .*run `ds-train prepare CONFIG` once"):
        CachedDataset(cache, model_config)
    result = prepare(cfg, str(manifest), text_tok, str(cache), audio_tokenizer=audio_tok)
    assert (result.encoded_shards, result.num_samples) == (1, 2)
    assert f"prepare: {cache} is in the pickled format of cache version 5; encoding it again" in capsys.readouterr().out
    assert not list(cache.glob("*.pt")) and len(CachedDataset(cache, model_config)) == 2
