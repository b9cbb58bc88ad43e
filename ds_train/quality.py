"""Quality of generated speech, judged by local models (no hub at run time), for the samples of ds_train.samples:

  samples_wer, samples_cer   word / character error rate of an ASR transcript against the prompt's text
                             (eval.asr_model: a Whisper dir, transformers' WhisperForConditionalGeneration)
  samples_speaker_sim        cosine similarity of the speaker embeddings of the clip and of the prompt's reference
                             clip (eval.speaker_model: a WavLM x-vector dir, transformers' WavLMForXVector)

Error rates are corpus-level (edits summed over clips / reference words or characters summed over clips) on texts
normalised by Whisper's BasicTextNormalizer (case and punctuation do not count). Rank 0 alone computes these, from
the generated waveforms after generation: the judges are not part of the ZeRO-3 engine, so nothing here is
collective (the other ranks wait at the next collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import librosa
import numpy as np
import torch

from ds_train.data.audio import LIBROSA_RESAMPLER, load_audio


@dataclass
class Errors:
    """Edit distance and reference length of one clip, in words and in characters."""
    word_edits: int
    words: int
    char_edits: int
    chars: int


def normalize(text: str) -> str:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()(text).strip()


def errors(reference: str, hypothesis: str) -> Errors:
    from torchaudio.functional import edit_distance

    ref, hyp = normalize(reference), normalize(hypothesis)
    return Errors(edit_distance(ref.split(), hyp.split()), len(ref.split()), edit_distance(ref, hyp), len(ref))


def _resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    return wav if rate == target else librosa.resample(wav, orig_sr=rate, target_sr=target, res_type=LIBROSA_RESAMPLER)


class Transcriber:
    """A local Whisper checkpoint: waveform -> text, by Whisper's own `generate` (language detection included)."""

    def __init__(self, path: str, device: str):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path).to(device).eval()

    @torch.no_grad()
    def __call__(self, wav: np.ndarray, rate: int) -> str:
        extractor = self.processor.feature_extractor
        features = extractor(_resample(wav, rate, extractor.sampling_rate), sampling_rate=extractor.sampling_rate,
                             return_tensors="pt").input_features
        ids = self.model.generate(features.to(self.model.device, self.model.dtype))
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class SpeakerEmbedder:
    """A local WavLM x-vector checkpoint: waveform -> speaker embedding."""

    def __init__(self, path: str, device: str):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self.extractor = AutoFeatureExtractor.from_pretrained(path)
        self.model = WavLMForXVector.from_pretrained(path).to(device).eval()
        self.min_samples = _min_samples(self.model.config)

    @torch.no_grad()
    def __call__(self, wav: np.ndarray, rate: int) -> torch.Tensor:
        wav = _resample(wav, rate, self.extractor.sampling_rate)
        if len(wav) < self.min_samples:
            # Shorter than the x-vector's TDNN needs (0.325 s for wavlm-base-plus-sv) it has no finite embedding;
            # trailing silence adds no voice.
            wav = np.pad(wav, (0, self.min_samples - len(wav)))
        inputs = self.extractor(wav, sampling_rate=self.extractor.sampling_rate, return_tensors="pt")
        return self.model(**inputs.to(self.model.device)).embeddings[0].float().cpu()

    def similarity(self, a: tuple[np.ndarray, int], b: tuple[np.ndarray, int]) -> float:
        return float(torch.nn.functional.cosine_similarity(self(*a), self(*b), dim=0))


def _min_samples(config) -> int:
    """Fewest input samples with a finite x-vector: its statistics pooling takes a standard deviation, so the TDNN
    (receptive field 1 + sum((kernel - 1) * dilation) frames) must put out 2 frames."""
    frames = 2 + sum((k - 1) * d for k, d in zip(config.tdnn_kernel, config.tdnn_dilation))
    samples = frames
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        samples = (samples - 1) * stride + kernel
    return samples


class Judges:
    """The eval.asr_model / eval.speaker_model judges of a run, loaded once (on rank 0)."""

    def __init__(self, asr_model: Optional[str], speaker_model: Optional[str], device: str):
        self.transcribe = Transcriber(asr_model, device) if asr_model else None
        self.speaker = SpeakerEmbedder(speaker_model, device) if speaker_model else None

    def score(self, clips: list[tuple[str, Optional[str], np.ndarray, int]]) -> tuple[dict, list[dict]]:
        """clips: (text, reference clip path or None, waveform, rate). Returns the run's metrics and one dict per
        clip (transcript, wer, cer, speaker_sim) for the clip's JSON."""
        per_clip, errs, sims = [], [], []
        for text, ref_audio, wav, rate in clips:
            info = {}
            if self.transcribe is not None:
                transcript = self.transcribe(wav, rate) if len(wav) else ""
                e = errors(text, transcript)
                errs.append(e)
                info.update(transcript=transcript, wer=e.word_edits / max(e.words, 1),
                            cer=e.char_edits / max(e.chars, 1))
            if self.speaker is not None and ref_audio and len(wav):
                rate_in = self.speaker.extractor.sampling_rate
                sims.append(self.speaker.similarity((wav, rate), (load_audio(ref_audio, rate_in), rate_in)))
                info["speaker_sim"] = sims[-1]
            per_clip.append(info)
        metrics = {}
        if errs:
            metrics["samples_wer"] = sum(e.word_edits for e in errs) / max(sum(e.words for e in errs), 1)
            metrics["samples_cer"] = sum(e.char_edits for e in errs) / max(sum(e.chars for e in errs), 1)
        if sims:
            metrics["samples_speaker_sim"] = sum(sims) / len(sims)
        return metrics, per_clip
