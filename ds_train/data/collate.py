"""Cache entry -> Boson's ChatMLDatasetSample -> Boson's collator -> a Batch of model inputs.

Teacher forcing comes from Boson's own pieces, configured like its serve engine: `prepare_chatml_sample` makes the
text labels (turns before `start_index` masked), `HiggsAudioSampleCollator` adds stream BOS/EOS, the delay pattern
and `label_audio_ids`. The collator writes -100 into the `label_ids` it is handed and then reads them to decide
whether audio is trained, so every call gets fresh copies: epoch 5 trains on exactly the labels of epoch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ds_train.data.audio import load_audio
from ds_train.loss import trained_positions

IGNORE = -100
WHISPER_RATE = 16000
DEFAULT_WHISPER_PROCESSOR = "openai/whisper-large-v3-turbo"  # what boson's serve engine loads


def to_dataset_sample(e: dict, audio_in_id: int, audio_out_id: int, whisper: bool = False):
    """A cache entry (see ds_train.data.prepare.encode_record) as the ChatMLDatasetSample boson's collator takes.

    Every tensor is fresh: the collator writes into label_ids, and the cache must stay as prepared.
    """
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    n = len(e["audio_starts"])
    if whisper:
        # Whisper features are computed for audio-in clips only, so only those are decoded; an audio-out clip
        # (every clip of the TTS layout) keeps its slot with an empty waveform.
        ids = e["input_ids"]
        kinds = ids[(ids == audio_in_id) | (ids == audio_out_id)].tolist()
        wavs = [torch.from_numpy(load_audio(p, WHISPER_RATE)) if kind == audio_in_id else torch.zeros(0)
                for p, kind in zip(e["audio_paths"], kinds)]
        wv_starts = torch.tensor([0] + [len(w) for w in wavs[:-1]], dtype=torch.long).cumsum(0)
        wv, rates = torch.cat(wavs), torch.full((n,), WHISPER_RATE)
    else:
        wv, wv_starts, rates = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return ChatMLDatasetSample(
        input_ids=e["input_ids"].to(torch.long, copy=True),
        label_ids=e["label_ids"].to(torch.long, copy=True),
        audio_ids_concat=e["audio_codes"].to(torch.long, copy=True),
        audio_ids_start=e["audio_starts"].clone(),
        audio_waveforms_concat=wv,
        audio_waveforms_start=wv_starts,
        audio_sample_rate=rates,
        audio_speaker_indices=torch.full((n,), -1, dtype=torch.long),
    )


def make_collator(model_config, whisper_processor_path: str = DEFAULT_WHISPER_PROCESSOR):
    """Boson's collator, configured like HiggsAudioServeEngine."""
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    whisper_processor = None
    if model_config.encode_whisper_embed:
        whisper_processor = load_whisper_processor(whisper_processor_path)
    return HiggsAudioSampleCollator(
        whisper_processor=whisper_processor,
        encode_whisper_embed=model_config.encode_whisper_embed,
        audio_in_token_id=model_config.audio_in_token_idx,
        audio_out_token_id=model_config.audio_out_token_idx,
        audio_stream_bos_id=model_config.audio_stream_bos_id,
        audio_stream_eos_id=model_config.audio_stream_eos_id,
        pad_token_id=model_config.pad_token_id,
        return_audio_in_tokens=False,
        use_delay_pattern=model_config.use_delay_pattern,
        audio_num_codebooks=model_config.audio_num_codebooks,
        round_to=1,
    )


def load_whisper_processor(path: str):
    """The Whisper feature extractor of a model that encodes audio-in with Whisper (model.whisper_processor_path)."""
    from transformers import AutoProcessor

    from ds_train.errors import ConfigError

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise ConfigError(f"cannot load the Whisper processor from model.whisper_processor_path={path} (this model "
                          f"has encode_whisper_embed=true): {str(e).splitlines()[0]}. Offline, point the key at a "
                          "local copy of the processor.") from None


@dataclass
class Batch:
    inputs: dict  # keyword arguments of HiggsAudioModel.forward (label_ids included: it yields expanded_labels)
    label_audio_ids: torch.Tensor  # (num_codebooks, N_audio_out), unshifted
    num_samples: int
    num_tokens: int  # text + audio positions the model processes (padding excluded)
    counts: torch.Tensor  # (1 + K,) trained text and per-codebook audio positions (loss.trained_positions)
    audio_owner: torch.Tensor  # (N_audio_out,) the sample each position of the audio-out stream belongs to
    indices: Optional[torch.Tensor] = None  # pairs only: the samples' indices in the training set (stay on the host)

    def to(self, device) -> "Batch":
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Batch(moved, self.label_audio_ids.to(device, non_blocking=True), self.num_samples, self.num_tokens,
                     self.counts, self.audio_owner.to(device, non_blocking=True), self.indices)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked host tensors make the copies above asynchronous."""
        pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Batch(pinned, self.label_audio_ids.pin_memory(), self.num_samples, self.num_tokens, self.counts,
                     self.audio_owner.pin_memory(), self.indices)


MODEL_INPUTS = ("input_ids", "attention_mask", "audio_features", "audio_feature_attention_mask", "audio_out_ids",
                "audio_out_ids_start", "audio_out_ids_start_group_loc", "audio_in_ids", "audio_in_ids_start",
                "label_ids")


class Collate:
    """Picklable collate_fn for DataLoader workers. With `pairs` (train.objective=dpo) the samples come as preference
    pairs, chosen then rejected (ds_train.data.pairs), each as (its index in the training set, sample): the text
    labels and the counts are the chosen samples' alone, what the SFT term of ds_train.dpo trains; the audio labels
    stay whole, DPO scores both clips; the indices name the samples' reference log-likelihoods."""

    def __init__(self, collator, pairs: bool = False):
        self.collator, self.pairs = collator, pairs

    def __call__(self, samples) -> Batch:
        indices = None
        if self.pairs:
            indices = torch.tensor([i for i, _ in samples], dtype=torch.long)
            samples = [s for _, s in samples]
        b = self.collator(samples)
        c = self.collator
        inputs = {k: getattr(b, k) for k in MODEL_INPUTS}
        n_out = len(b.audio_out_ids_start) if b.audio_out_ids_start is not None else 0
        audio_len = b.audio_out_ids.shape[1] if b.audio_out_ids is not None and b.audio_out_ids.numel() else 0
        num_tokens = int(b.attention_mask.sum()) - n_out + audio_len
        labels_audio = b.label_audio_ids if b.label_audio_ids is not None else torch.zeros(0, 0, dtype=torch.long)
        owner = audio_owner(b.input_ids, b.audio_out_ids_start, audio_len, c.audio_out_token_id)
        counted = labels_audio
        if self.pairs:
            b.label_ids[1::2] = IGNORE  # the forward's expanded_labels: the chosen rows' text alone
            counted = chosen_only(labels_audio, owner)
        counts = trained_positions(b.input_ids, b.label_ids, counted,
                                   (c.audio_in_token_id, c.audio_out_token_id), c.audio_num_codebooks)
        return Batch(inputs, labels_audio, len(samples), num_tokens, counts, owner, indices)


def audio_owner(input_ids: torch.Tensor, starts, audio_len: int, audio_out_id: int) -> torch.Tensor:
    """(audio_len,) the batch row of each position of the collated audio-out stream. The collator lays the audio-out
    segments end to end in row order, one per <|AUDIO_OUT|> token of the row (its audio_out_ids_start_group_loc has
    one entry per sample, not per segment, so it cannot say)."""
    per_row = (input_ids == audio_out_id).sum(dim=1)
    if not audio_len:
        return torch.zeros(0, dtype=torch.long)
    segment_row = torch.repeat_interleave(torch.arange(len(per_row)), per_row)
    bounds = torch.cat([starts.to(torch.long), torch.tensor([audio_len])])
    if len(segment_row) != len(starts):
        raise RuntimeError(f"{len(starts)} audio-out segments for {len(segment_row)} <|AUDIO_OUT|> tokens")
    return torch.repeat_interleave(segment_row, bounds.diff())


def chosen_only(label_audio_ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The audio labels of the chosen samples of a batch of pairs (even rows); the rejected ones' are IGNORE."""
    if not label_audio_ids.numel():
        return label_audio_ids
    return label_audio_ids.masked_fill((owner % 2 == 1).to(label_audio_ids.device)[None], IGNORE)
