"""ds_train/data/audio.py: the audio formats the README lists load, at any rate and channel count, to mono at the
tokenizer's rate."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from ds_train.data.audio import audio_info, load_audio

FORMATS = [("wav", "PCM_U8"), ("wav", "PCM_16"), ("wav", "PCM_24"), ("wav", "PCM_32"), ("wav", "FLOAT"),
           ("flac", "PCM_16"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III")]


@pytest.mark.parametrize("ext, subtype", FORMATS)
@pytest.mark.parametrize("rate, channels", [(22050, 1), (44100, 2)])
def test_readme_audio_formats_load(tmp_path, ext, subtype, rate, channels):
    t = np.arange(int(0.8 * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 220 * t)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, np.stack([tone] * channels, axis=1), rate, subtype=subtype)
    sr, seconds = audio_info(path)
    assert sr == rate and seconds == pytest.approx(0.8, abs=0.06)  # mp3 pads a frame
    wav = load_audio(path, 24000)
    assert wav.ndim == 1 and len(wav) == pytest.approx(0.8 * 24000, abs=0.06 * 24000)
    assert 0.3 < np.abs(wav).max() < 0.7  # the tone, downmixed (not summed) and not silence
