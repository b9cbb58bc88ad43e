"""Training data: prepared cache -> ChatMLDatasetSample -> Boson's collator -> model inputs.

Teacher forcing comes from Boson's own pieces, configured like its serve engine: `prepare_chatml_sample` makes the
text labels (turns before `start_index` masked), `HiggsAudioSampleCollator` adds stream BOS/EOS, the delay pattern
and `label_audio_ids`. The collator writes -100 into the `label_ids` it is handed and then reads them to decide
whether audio is trained, so every call gets fresh copies: epoch 5 trains on exactly the labels of epoch 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ds_train.audio import load_audio
from ds_train.sampler import MicroBatchSampler

IGNORE = -100
WHISPER_RATE = 16000


class CachedDataset(Dataset):
    """Samples of a prepared cache (see ds_train.prepare), in manifest order."""

    def __init__(self, cache_dir: str | Path, model_config, whisper: bool = False):
        cache = Path(cache_dir)
        index_path = cache / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no prepared cache at {cache}: run `ds-train prepare CONFIG` first")
        self.index = json.loads(index_path.read_text())
        self.entries = []
        for k in range(self.index["num_shards"]):
            self.entries += torch.load(cache / f"shard-{k:05d}.pt", weights_only=False, mmap=True)["entries"]
        self.audio_in_id = model_config.audio_in_token_idx
        self.audio_out_id = model_config.audio_out_token_idx
        self.num_codebooks = model_config.audio_num_codebooks
        self.delay = bool(model_config.use_delay_pattern)
        self.whisper = whisper
        for e in self.entries:
            if e["audio_codes"].shape[0] < self.num_codebooks:
                raise ValueError(f"{e['source']}: cached audio has {e['audio_codes'].shape[0]} codebooks, "
                                 f"the model needs {self.num_codebooks} (audio tokenizer does not match the model)")
        self.lengths = [self.merged_length(e) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def merged_length(self, e: dict) -> int:
        """Sequence length after the model merges audio-out codes into the text stream (what costs compute)."""
        ids = e["input_ids"]
        out_positions = (ids == self.audio_out_id).nonzero().flatten().tolist()
        audio_ids = (ids == self.audio_in_id) | (ids == self.audio_out_id)
        order = audio_ids.nonzero().flatten().tolist()
        starts = e["audio_starts"].tolist() + [e["audio_codes"].shape[1]]
        extra = 0
        for j, pos in enumerate(order):
            if pos in out_positions:
                extra += starts[j + 1] - starts[j] + 2 + (self.num_codebooks - 1 if self.delay else 0) - 1
        return len(ids) + extra

    def __getitem__(self, i: int):
        return to_dataset_sample(self.entries[i], self.audio_in_id, self.audio_out_id, self.whisper)


def to_dataset_sample(e: dict, audio_in_id: int, audio_out_id: int, whisper: bool = False):
    """A cache entry (see ds_train.prepare.encode_record) as the ChatMLDatasetSample boson's collator takes.

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


def make_collator(model_config, text_tokenizer):
    """Boson's collator, configured like HiggsAudioServeEngine."""
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    whisper_processor = None
    if model_config.encode_whisper_embed:
        from transformers import AutoProcessor

        whisper_processor = AutoProcessor.from_pretrained("openai/whisper-large-v3-turbo", trust_remote_code=False)
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


@dataclass
class Batch:
    inputs: dict  # keyword arguments of HiggsAudioModel.forward (label_ids included: it yields expanded_labels)
    label_audio_ids: torch.Tensor  # (num_codebooks, N_audio_out), unshifted
    num_samples: int
    num_tokens: int  # text + audio positions the model processes (padding excluded)

    def to(self, device) -> "Batch":
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Batch(moved, self.label_audio_ids.to(device), self.num_samples, self.num_tokens)


MODEL_INPUTS = ("input_ids", "attention_mask", "audio_features", "audio_feature_attention_mask", "audio_out_ids",
                "audio_out_ids_start", "audio_out_ids_start_group_loc", "audio_in_ids", "audio_in_ids_start",
                "label_ids")


class Collate:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, samples) -> Batch:
        b = self.collator(samples)
        inputs = {k: getattr(b, k) for k in MODEL_INPUTS}
        n_out = len(b.audio_out_ids_start) if b.audio_out_ids_start is not None else 0
        audio_len = b.audio_out_ids.shape[1] if b.audio_out_ids is not None and b.audio_out_ids.numel() else 0
        num_tokens = int(b.attention_mask.sum()) - n_out + audio_len
        labels_audio = b.label_audio_ids if b.label_audio_ids is not None else torch.zeros(0, 0, dtype=torch.long)
        return Batch(inputs, labels_audio, len(samples), num_tokens)


def build_loader(dataset: CachedDataset, collator, cfg, rank: int, world: int, shuffle: bool = True,
                 sampler: Optional[MicroBatchSampler] = None) -> tuple[DataLoader, MicroBatchSampler]:
    d = cfg.data
    sampler = sampler or MicroBatchSampler(
        dataset.lengths, rank, world, cfg.train.grad_accum, cfg.train.seed,
        micro_batch_size=cfg.train.micro_batch_size, max_tokens=d.max_tokens, shuffle=shuffle)
    kwargs = {}
    if d.num_workers > 0:
        kwargs = {"persistent_workers": d.persistent_workers, "prefetch_factor": d.prefetch_factor}
    # Its own generator: otherwise each iter(loader) draws a seed from the global RNG, and a resumed run (which
    # starts an iterator mid-epoch) would draw at a different point than an uninterrupted one.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(collator), num_workers=d.num_workers,
                        pin_memory=d.pin_memory and torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(cfg.train.seed), **kwargs)
    return loader, sampler
