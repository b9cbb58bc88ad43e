"""Synthetic TTS micro-batches of a given length distribution, for bench-train without prepared data.

Each sample has the shape of a prepared TTS sample: a text prompt, then `<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>
<|eot_id|>` whose labels are trained (as Boson's prepare_chatml_sample labels an assistant audio turn), with random
codes for the audio. They go through Boson's collator like real data (stream BOS/EOS, delay pattern, labels).
"""

from __future__ import annotations

import torch

from ds_train.data.collate import Collate, make_collator

TEXT_IDS = 256  # byte tokens: valid in the tiny tokenizer and in the real-id one


def parse_lengths(spec: str) -> tuple[int, int]:
    """'512' -> (512, 512); '256:1024' -> uniform in [256, 1024]: merged positions per sample."""
    lo, _, hi = spec.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 16 <= lo <= hi:
        raise ValueError(f"--synthetic {spec!r}: need 16 <= MIN <= MAX positions")
    return lo, hi


def synthetic_sample(model_config, length: int, audio_fraction: float, gen: torch.Generator):
    """A ChatMLDatasetSample whose merged sequence has `length` positions, ~audio_fraction of them audio."""
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    k = model_config.audio_num_codebooks
    delay = k - 1 if model_config.use_delay_pattern else 0
    # merged length = text tokens - 1 (AUDIO_OUT placeholder) + codes + 2 (stream BOS/EOS) + delay
    codes = max(1, int(length * audio_fraction) - 2 - delay)
    tail = [model_config.audio_out_bos_token_id, model_config.audio_out_token_idx, model_config.audio_eos_token_id,
            model_config.audio_eos_token_id]  # the last stands in for <|eot_id|>: a trained text label
    text = max(2, length - codes - 2 - delay + 1 - len(tail))
    prompt = torch.randint(TEXT_IDS, (text,), generator=gen).tolist()
    input_ids = torch.tensor(prompt + tail)
    label_ids = torch.tensor([-100] * text + tail)
    audio = torch.randint(model_config.audio_codebook_size, (k, codes), generator=gen)
    return ChatMLDatasetSample(
        input_ids=input_ids, label_ids=label_ids, audio_ids_concat=audio, audio_ids_start=torch.tensor([0]),
        audio_waveforms_concat=torch.zeros(0), audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0), audio_speaker_indices=torch.full((1,), -1, dtype=torch.long))


class SyntheticBatches:
    """Micro-batch i of rank r is the same for every run with the same seed (ours and the HF baseline)."""

    def __init__(self, model_config, lengths: tuple[int, int], samples_per_batch: int, audio_fraction: float,
                 seed: int):
        self.model_config, self.lengths, self.n, self.audio_fraction = model_config, lengths, samples_per_batch, \
            audio_fraction
        self.seed = seed
        self.collate = Collate(make_collator(model_config))

    def batch(self, index: int, rank: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 1009 + rank)
        lo, hi = self.lengths
        lengths = torch.randint(lo, hi + 1, (self.n,), generator=gen).tolist()
        return self.collate([synthetic_sample(self.model_config, n, self.audio_fraction, gen) for n in lengths])
