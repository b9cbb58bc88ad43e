"""ds_train/data/encoder.py and the batched encoder of audio.py: decoding in worker processes gives the codes decoding
in the encoding process gives; padded batches give each clip one-by-one's number of frames but change codes, which is
why one-by-one stays the default (the fraction that differs is measured and printed); prepare with either."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from ds_train.config import DataConfig
from ds_train.data.audio import AudioError, encode, encode_padded, frames, load_audio
from ds_train.data.encoder import ClipCodes
from ds_train.demo.data import RATE, synth
from ds_train.errors import CacheMismatchError
from test_prepare import assert_same_cache, make_cfg, short_set

# Lengths from 0.1 s to 1.2 s (22.05 kHz, resampled to the tokenizer's 16 kHz), no two alike.
TEXTS = ["hi", "calm", "hello", "a reference", "another line", "hello world again", "the quick brown fox",
         "jumps over the lazy dog", "blue sky"]


@pytest.fixture(scope="module")
def audio_tok(tiny_model):
    from ds_train.data.audio import load_audio_tokenizer

    return load_audio_tokenizer(str(tiny_model / "audio_tokenizer"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("clips")
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(str(d / f"{i}.wav"))
        sf.write(paths[-1], synth(text, 110.0 + 15 * i), RATE)
    assert len({sf.info(p).frames for p in paths}) == len(paths)
    return paths


def test_frames_is_the_code_length_of_one_by_one_encoding(audio_tok):
    """audio.frames (conv arithmetic, no tensors) against boson's encode, at lengths around frame boundaries, where
    boson's two branches disagree and it encodes the acoustic one again."""
    rng = np.random.default_rng(0)
    hop = int(audio_tok.hop_length)
    lengths = sorted({*rng.integers(400, 40_000, 16).tolist(), *(n * hop + d for n in (3, 10, 37) for d in (-1, 0, 1)),
                      hop * 25 // 2})
    got = [frames(audio_tok, n) for n in lengths]
    want = [encode(audio_tok, 0.1 * rng.standard_normal(n).astype(np.float32)).shape[1] for n in lengths]
    assert got == want, [(n, g, w) for n, g, w in zip(lengths, got, want) if g != w]


def test_padded_batches_change_codes_so_one_by_one_stays_the_default(audio_tok, clips):
    one = ClipCodes(audio_tok, loudness_normalize=False, workers=0, batch=1)
    one.encode(clips)
    batched = ClipCodes(audio_tok, loudness_normalize=False, workers=0, batch=4)
    batched.encode(clips)
    differ = total = 0
    for path in clips:
        a, b = one(path), batched(path)
        assert a.dtype == b.dtype == torch.int16
        assert a.shape == b.shape, (path, a.shape, b.shape)  # padding frames trimmed: one-by-one's length
        differ += int((a != b).sum())
        total += a.numel()
    print(f"padded batches of 4 (9 clips, 0.1-1.2 s): {differ}/{total} codes = {differ / total:.1%} differ from "
          "one-by-one")
    # Measured 2026-12-03: 577 of 1912 codes (30.2%). Padding anywhere in the input moves codes everywhere in it:
    # HuBERT's group norm and unmasked attention see the other clips' padding lengths through the whole clip.
    assert differ / total > 0.2
    assert DataConfig.__dataclass_fields__["encode_batch"].default == 1

    # Padding, not batching, is the cause: clips of one length in one call (no padding) give one-by-one's codes.
    n = min(len(load_audio(p, audio_tok.sampling_rate)) for p in clips)
    same = [load_audio(p, audio_tok.sampling_rate)[:n] for p in clips[:4]]
    assert all(torch.equal(encode(audio_tok, w), c) for w, c in zip(same, encode_padded(audio_tok, same)))


def test_decode_workers_give_the_same_codes_and_report_a_clip_that_fails(audio_tok, clips, tmp_path):
    """2 worker processes vs decoding in this process: the same codes; a clip that cannot be decoded (changed since
    prepare's check pass) is an AudioError for its records, not a dead worker. Remembered clips are not decoded
    again."""
    (tmp_path / "bad.wav").write_bytes(b"RIFF not audio")
    paths = [*clips[:5], str(tmp_path / "bad.wav")]
    here = ClipCodes(audio_tok, loudness_normalize=False, workers=0)
    here.encode(paths)
    workers = ClipCodes(audio_tok, loudness_normalize=False, workers=2)
    workers.encode(paths)
    for path in clips[:5]:
        assert torch.equal(here(path), workers(path))
    with pytest.raises(AudioError, match="cannot decode audio"):
        workers(str(tmp_path / "bad.wav"))
    memo = dict(workers.memo)
    workers.encode(clips[:5])  # all remembered: no loader, the same tensors
    assert all(workers(p) is memo[p] for p in clips[:5])


def test_prepare_with_decode_workers_writes_the_cache_in_process_decoding_writes(tiny_model, tmp_path):
    """data.decode_workers changes where clips are decoded, never the cache's bytes; data.encode_batch > 1 is part of
    the cache's fingerprint (its codes are other codes), 1 is not (caches made before it existed stay current)."""
    from transformers import AutoTokenizer

    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    from ds_train.data.cache import CachedDataset, fingerprint
    from ds_train.data.prepare import prepare

    text_tok = AutoTokenizer.from_pretrained(str(tiny_model))
    manifest, _ = short_set(tmp_path / "set", 5)
    caches = {}
    for workers in (0, 2):
        cfg = make_cfg(tiny_model, tmp_path / f"out{workers}", shard_size=2, decode_workers=workers)
        caches[workers] = tmp_path / f"cache{workers}"
        assert prepare(cfg, str(manifest), text_tok, str(caches[workers])).encoded_shards == 3
    assert_same_cache(caches[0], caches[2])
    assert "encode_batch" not in fingerprint(cfg, text_tok, cfg.model.audio_tokenizer_path)["settings"]

    batched = make_cfg(tiny_model, tmp_path / "outb", shard_size=2, encode_batch=4)
    with pytest.raises(CacheMismatchError, match=r"settings.encode_batch \(None then, 4 now\)"):
        prepare(batched, str(manifest), text_tok, str(caches[0]))
    result = prepare(batched, str(manifest), text_tok, str(tmp_path / "cacheb"))
    assert (result.encoded_shards, result.num_samples) == (3, 5)
    config = HiggsAudioConfig.from_pretrained(str(tiny_model))
    for a, b in zip(CachedDataset(caches[0], config).entries, CachedDataset(tmp_path / "cacheb", config).entries):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["audio_starts"], b["audio_starts"])
        assert a["audio_codes"].shape == b["audio_codes"].shape  # other codes, each clip's one-by-one length
