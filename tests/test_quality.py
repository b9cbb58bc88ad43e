"""ds_train/quality.py: WER/CER from an ASR model and speaker similarity from an x-vector model, on tiny random-weight
models of the real classes (tests/conftest.py: tiny_judges). The in-training use is checked on the memorised run
(tests/test_generate.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import JUDGE_HEARS


def test_error_rates_are_edit_distances_on_normalised_text():
    from ds_train.quality import errors

    e = errors("Calm sea.", "calm, SEE")  # case and punctuation do not count
    assert (e.word_edits, e.words, e.char_edits, e.chars) == (1, 2, 1, 8)
    e = errors("the quick fox", "quick the fox jumps")
    assert (e.word_edits, e.words) == (3, 3)
    assert errors("", "anything").words == 0


def noise(seconds: float, seed: int, rate: int = 22050) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(rate * seconds))).astype(np.float32)


def test_whisper_judge_transcribes_and_scores_corpus_level(tiny_judges):
    from ds_train.quality import Judges

    asr, _ = tiny_judges
    judges = Judges(str(asr), None, "cpu")
    assert judges.transcribe(noise(0.7, 0), 22050) == JUDGE_HEARS  # resampled to 16 kHz, Whisper's own generate
    metrics, clips = judges.score([("calm", None, noise(0.4, 1), 22050), ("red fox", None, noise(0.3, 2), 22050),
                                   ("silent", None, np.zeros(0, np.float32), 16000)])
    # "Clam!" -> "clam": calm 1 word / 2 chars wrong of 1 / 4; "red fox" 2 / 7 of 2 / 7; an empty clip hears nothing.
    assert [c["transcript"] for c in clips] == [JUDGE_HEARS, JUDGE_HEARS, ""]
    assert [c["wer"] for c in clips] == [1.0, 1.0, 1.0] and [c["cer"] for c in clips] == [0.5, 1.0, 1.0]
    assert metrics == {"samples_wer": 4 / 4, "samples_cer": (2 + 7 + 6) / (4 + 7 + 6)}  # not the mean of clips


def test_speaker_similarity_and_the_xvector_receptive_field(tiny_judges, tmp_path):
    import soundfile as sf
    import torch

    from ds_train.quality import Judges, SpeakerEmbedder

    _, speaker = tiny_judges
    embed = SpeakerEmbedder(str(speaker), "cpu")
    # The TDNN of wavlm-base-plus-sv (kernels 5,3,3,1,1; dilations 1,2,3,1,1) turns 16 frames (5200 samples) into
    # the 2 that statistics pooling needs for a finite standard deviation.
    assert embed.min_samples == 5200
    for n, finite in [(5199, False), (5200, True)]:
        with torch.no_grad():
            x = embed.model(0.1 * torch.randn(1, n)).embeddings
        assert bool(x.isfinite().all()) == finite
    a, b = noise(0.5, 3, 16000), noise(0.5, 4, 16000)
    assert embed.similarity((a, 16000), (a, 16000)) == pytest.approx(1.0, abs=1e-6)
    sim = embed.similarity((a, 16000), (b, 16000))
    assert -1.0 < sim < 0.9999
    short = a[:1600]  # 0.1 s: padded with silence to the receptive field
    assert torch.equal(embed(short, 16000), embed(np.pad(short, (0, 5200 - 1600)), 16000))

    sf.write(tmp_path / "ref.wav", b, 16000, subtype="FLOAT")
    metrics, clips = Judges(None, str(speaker), "cpu").score([("x", str(tmp_path / "ref.wav"), a, 16000),
                                                              ("y", None, a, 16000)])  # no reference: no score
    assert clips[0]["speaker_sim"] == pytest.approx(sim, abs=1e-6) and clips[1] == {}
    assert metrics == {"samples_speaker_sim": clips[0]["speaker_sim"]}


def test_judges_must_be_local_model_dirs(tiny_judges, tmp_path):
    from ds_train.config import load_config
    from ds_train.errors import ConfigError
    from ds_train.preflight import check_judges

    asr, speaker = tiny_judges
    base = ["model.path=/m", "model.audio_tokenizer_path=/t", "data.train_file=/d.jsonl", "train.output_dir=/o",
            "eval.samples=1"]
    check_judges(load_config(None, [*base, f"eval.asr_model={asr}", f"eval.speaker_model={speaker}"]))
    with pytest.raises(ConfigError, match="eval.speaker_model=openai/whisper-tiny is not a local model dir"):
        check_judges(load_config(None, [*base, f"eval.asr_model={asr}", "eval.speaker_model=openai/whisper-tiny"]))
