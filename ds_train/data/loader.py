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
from ds_train.data.collate import Batch, Collate, make_collator
from ds_train.data.prepare import prepare_all, write_report
from ds_train.data.sampler import MicroBatchSampler
from ds_train.errors import DataError


@dataclass
class EvalData:
    """This rank's eval micro-batches, and a filler batch for the rounds in which it has none of its own (ZeRO-3:
    every rank joins every forward; a filler's loss counts with weight 0)."""
    loader: DataLoader
    sampler: MicroBatchSampler
    collate: Collate

    def filler(self) -> Batch:
        dataset = self.loader.dataset
        return self.collate([dataset[i] for i in self.sampler.plan()[0]])


@dataclass
class Data:
    train_set: CachedDataset
    loader: DataLoader
    sampler: MicroBatchSampler
    eval: Optional[EvalData]
    bad_samples_skipped: int


def build_data(cfg: Config, model_config, text_tokenizer, out: Path) -> Data:
    """Prepare (or reuse) the caches on all ranks, then loaders over this rank's shard of the micro-batches."""
    prepared = prepare_all(cfg, text_tokenizer)
    if dist.is_main():
        write_report(out, prepared)
    rank, world, whisper = dist.rank(), dist.world_size(), bool(model_config.encode_whisper_embed)
    train_set = CachedDataset(prepared[0].cache_dir, model_config, whisper)
    too_long = fit_max_tokens(train_set, cfg, cfg.data.train_file)
    collator = make_collator(model_config, cfg.model.whisper_processor_path)
    loader, sampler = build_loader(train_set, collator, cfg, rank, world)
    eval_data = None
    if cfg.data.eval_file:
        eval_set = CachedDataset(prepared[1].cache_dir, model_config, whisper)
        too_long += fit_max_tokens(eval_set, cfg, cfg.data.eval_file)
        # Evaluation keeps every sample (no dropping, no shuffling); ranks may differ by a micro-batch.
        eval_sampler = MicroBatchSampler(eval_set.lengths, rank, world, 1, cfg.train.seed,
                                         micro_batch_size=cfg.train.micro_batch_size, max_tokens=cfg.data.max_tokens,
                                         shuffle=False, drop_remainder=False)
        eval_loader, _ = build_loader(eval_set, collator, cfg, rank, world, sampler=eval_sampler)
        eval_data = EvalData(eval_loader, eval_sampler, eval_loader.collate_fn)
    return Data(train_set, loader, sampler, eval_data, sum(len(p.bad) for p in prepared) + too_long)


def fit_max_tokens(dataset: CachedDataset, cfg: Config, manifest: str) -> int:
    """Samples longer than data.max_tokens fit no micro-batch: name their manifest lines before any training
    (DataError), or with data.skip_bad drop them from `dataset` and return how many."""
    limit = cfg.data.max_tokens
    if not limit:
        return 0
    long = [i for i, n in enumerate(dataset.lengths) if n > limit]
    if not long:
        return 0
    bad = [{"source": dataset.entries[i]["source"],
            "reason": f"{dataset.lengths[i]} tokens (text + audio frames), more than data.max_tokens={limit}"}
           for i in long]
    if not cfg.data.skip_bad:
        raise DataError(bad, f"{manifest}: longer than data.max_tokens={limit} fits (the longest needs "
                             f"{max(dataset.lengths)}: raise it)")
    dataset.drop(long)
    dist.print0(f"skipped {len(long)} sample(s) of {manifest} longer than data.max_tokens={limit}: "
                + ", ".join(b["source"] for b in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return len(long)


def build_loader(dataset: CachedDataset, collator, cfg, rank: int, world: int,
                 sampler: Optional[MicroBatchSampler] = None) -> tuple[DataLoader, MicroBatchSampler]:
    d = cfg.data
    if sampler is None:  # not `sampler or ...`: a sampler with no batch for this rank has len() 0 and is falsy
        sampler = MicroBatchSampler(dataset.lengths, rank, world, cfg.train.grad_accum, cfg.train.seed,
                                    micro_batch_size=cfg.train.micro_batch_size, max_tokens=d.max_tokens)
    kwargs = {}
    if d.num_workers > 0:
        kwargs = {"persistent_workers": d.persistent_workers, "prefetch_factor": d.prefetch_factor}
    # Its own generator: otherwise each iter(loader) draws a seed from the global RNG, and a resumed run (which
    # starts an iterator mid-epoch) would draw at a different point than an uninterrupted one.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(collator), num_workers=d.num_workers,
                        pin_memory=d.pin_memory and torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(cfg.train.seed), **kwargs)
    return loader, sampler
