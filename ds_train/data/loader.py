"""DataLoaders over this rank's micro-batches of the prepared caches (prepared first when missing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ds_train import dist
from ds_train.config import Config
from ds_train.data.cache import CachedDataset
from ds_train.data.collate import Collate, make_collator
from ds_train.data.prepare import prepare, write_report
from ds_train.data.sampler import MicroBatchSampler


@dataclass
class Data:
    train_set: CachedDataset
    loader: DataLoader
    sampler: MicroBatchSampler
    eval_loader: Optional[DataLoader]
    bad_samples_skipped: int


def build_data(cfg: Config, model_config, text_tokenizer, out: Path) -> Data:
    """Prepare (or reuse) the caches on all ranks, then loaders over this rank's shard of the micro-batches."""
    prepared = [prepare(cfg, cfg.data.train_file, text_tokenizer, cfg.data.cache_dir)]
    if cfg.data.eval_file:
        prepared.append(prepare(cfg, cfg.data.eval_file, text_tokenizer))
    if dist.is_main():
        write_report(out, prepared)
    rank, world, whisper = dist.rank(), dist.world_size(), bool(model_config.encode_whisper_embed)
    train_set = CachedDataset(prepared[0].cache_dir, model_config, whisper)
    collator = make_collator(model_config, text_tokenizer)
    loader, sampler = build_loader(train_set, collator, cfg, rank, world)
    eval_loader = None
    if cfg.data.eval_file:
        eval_set = CachedDataset(prepared[1].cache_dir, model_config, whisper)
        # Evaluation keeps every sample (no dropping); `evaluate` evens out the ranks' forward counts.
        eval_sampler = MicroBatchSampler(eval_set.lengths, rank, world, 1, cfg.train.seed,
                                         micro_batch_size=cfg.train.micro_batch_size, shuffle=False,
                                         drop_remainder=False)
        eval_loader, _ = build_loader(eval_set, collator, cfg, rank, world, sampler=eval_sampler)
    return Data(train_set, loader, sampler, eval_loader, sum(len(p.bad) for p in prepared))


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
