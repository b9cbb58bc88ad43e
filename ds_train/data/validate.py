"""Is a record trainable? Schema, text, tokenization and each clip (header, truncation, one full decode, silence,
durations), answered before any encoding starts so that one report lists every bad sample."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ds_train.config import Config
from ds_train.data import clips
from ds_train.data.audio import AudioError, audio_info, load_audio
from ds_train.data.manifest import Record, audio_contents, text_of, tokenize

SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below this carries no speech
MIN_SOURCE_RATE = 8000  # below this, resampling up cannot recover what the tokenizer expects
LOUDNESS_BLOCK_SECONDS = 0.4  # pyloudnorm measures in 400 ms blocks and raises on a shorter clip


def check_record(rec: Record, text_tokenizer, problem_of) -> Optional[dict]:
    """None for a usable record, {"source", "reason"} for a bad one."""

    def bad(reason):
        return {"source": rec.source, "reason": reason}

    if rec.error:
        return bad(rec.error)
    for text in text_of(rec.sample):
        if not text.strip():
            return bad("empty text")
    clips = audio_contents(rec.sample)
    if not clips:
        return bad("no audio in sample")
    for clip in clips:
        problem = problem_of(clip.audio_url)
        if problem:
            found = bad(f"{problem}: {clip.audio_url}")
            if "_audio_seconds=" in problem:  # a duration limit: kept with its length, to judge again later
                found.update(clip=clip.audio_url, seconds=audio_info(clip.audio_url)[1])
            return found
    tokens = tokenize(rec.sample, text_tokenizer)
    if tokens is None:  # boson's helper prints the exception and returns None
        return bad("could not be tokenized (see the message printed above)")
    if all(t < 0 for t in tokens[1]):
        return bad("nothing to train on: every label is masked (check start_index and the assistant turns)")
    return None


def duration_problem(seconds: float, low: float, high: float) -> Optional[str]:
    """The data.min/max_audio_seconds check. The cache keeps every clip's duration and prepare and the dataset
    apply it again with the current limits, so changing them never re-encodes what is already encoded."""
    if seconds > high:
        return f"audio is {seconds:.1f}s, longer than data.max_audio_seconds={high}"
    if seconds < low:
        return f"audio is {seconds:.3f}s, shorter than data.min_audio_seconds={low}"
    return None


def clip_problem(path: str, cfg: Config) -> Optional[str]:
    """Why this audio file (or member of a data set's file, clips.py) cannot be trained on, or None. Header checks
    first, then one full decode."""
    d = cfg.data
    if not clips.exists(path):
        return "audio file not found" if clips.split(path)[1] is None else "audio not found in its data set file"
    try:
        sr, seconds = audio_info(path)
    except AudioError as e:
        return str(e)
    if sr < MIN_SOURCE_RATE:
        return f"sample rate {sr} Hz is below the {MIN_SOURCE_RATE} Hz the audio tokenizer can take"
    if seconds > d.max_audio_seconds:  # from the header: a two-hour file is not decoded to learn this
        return duration_problem(seconds, d.min_audio_seconds, d.max_audio_seconds)
    missing = _wav_missing_bytes(path)
    if missing:
        return f"truncated WAV: its header promises {missing} more bytes of audio than the file holds"
    try:
        wav = load_audio(path, sr)  # decode only (mono); the rate is already the file's
    except AudioError as e:
        return str(e)
    seconds = len(wav) / sr
    if not np.isfinite(wav).all():
        return "audio contains NaN or infinite samples"
    peak = float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        return f"audio is silent (peak {peak:.1e} < {SILENCE_PEAK:.0e})"
    if seconds < d.min_audio_seconds:
        return duration_problem(seconds, d.min_audio_seconds, d.max_audio_seconds)
    if d.loudness_normalize and seconds <= LOUDNESS_BLOCK_SECONDS:
        return f"audio is {seconds:.3f}s, too short for data.loudness_normalize (needs > {LOUDNESS_BLOCK_SECONDS}s)"
    return None


def _wav_missing_bytes(path: str) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares but does not hold (0 for a whole file or another format).

    libsndfile reads a truncated WAV without complaint, as a shorter clip whose transcript no longer matches.
    """
    clip = clips.open_clip(path)
    with (open(clip, "rb") if isinstance(clip, str) else clip) as f:
        total = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return 0
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                if size in (0, 0xFFFFFFFF):  # streaming writers leave the size open
                    return 0
                return max(0, size - (total - f.tell()))
            f.seek(size + (size & 1), os.SEEK_CUR)
