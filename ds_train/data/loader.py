"""DataLoaders over this rank's micro-batches of the prepared caches (prepared first when missing), the training
manifests mixed by weight and an eval set from data.eval_file or data.eval_split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ds_train import dist
from ds_train.config import Config
from ds_train.data.cache import CachedDataset
from ds_train.data.collate import Batch, Collate, make_collator
from ds_train.data.pairs import IndexedSamples, PairSampler, pair_indices
from ds_train.data.prepare import prepare_all, write_report
from ds_train.data.sampler import MicroBatchSampler, per_epoch
from ds_train.data.split import split_eval
from ds_train.errors import ConfigError, DataError


@dataclass
class EvalData:
    """This rank's eval micro-batches, and a filler batch for the rounds in which it has none of its own (ZeRO-3:
    every rank joins every forward; a filler's loss counts with weight 0)."""
    loader: DataLoader
    sampler: MicroBatchSampler
    collate: Collate

    def filler(self) -> Batch:
        dataset = self.loader.dataset
        return self.collate([dataset[i] for i in self.sampler.first_batch()])


@dataclass
class Data:
    train_set: CachedDataset
    loader: DataLoader
    sampler: MicroBatchSampler
    eval: Optional[EvalData]
    bad_samples_skipped: int
    held_out: dict[str, set[str]] = field(default_factory=dict)  # data.eval_split: {manifest: sources held out}


def build_data(cfg: Config, model_config, text_tokenizer, out: Path) -> Data:
    """Prepare (or reuse) the caches on all ranks, then loaders over this rank's shard of the micro-batches: the
    training manifests as one dataset with their weights (data.train_files), and the eval file or the samples
    data.eval_split holds out."""
    prepared = prepare_all(cfg, text_tokenizer)
    rank, world, whisper = dist.rank(), dist.world_size(), bool(model_config.encode_whisper_embed)
    manifests = cfg.data.manifests()
    parts, too_long = [], 0
    for (manifest, _), result in zip(manifests, prepared):
        part = CachedDataset(result.cache_dir, model_config, whisper)
        too_long += fit_max_tokens(part, cfg, manifest)
        parts.append(part)
    eval_set, held_out = None, {}
    if cfg.data.eval_file:
        eval_set = CachedDataset(prepared[-1].cache_dir, model_config, whisper)
        too_long += fit_max_tokens(eval_set, cfg, cfg.data.eval_file)
    elif cfg.data.eval_split:
        split = split_eval(parts, [m for m, _ in manifests], cfg.data.eval_split, cfg.train.seed, cfg.data.format,
                           cfg.data.columns)
        parts, eval_set, held_out = split.train, split.eval, split.held_out
        dist.print0(split.line)
    mix = mix_report(manifests, parts, held_out if cfg.data.eval_split else None)
    if cfg.data.train_files is not None:
        dist.print0("data mix: " + "; ".join(f"{Path(r['manifest']).name} {r['samples']:,} samples x weight "
                                             f"{r['weight']:g} = {r['per_epoch']:,} per epoch ({r['share']:.1%})"
                                             for r in mix))
    if dist.is_main():
        write_report(out, prepared, mix)
    train_set = CachedDataset.concat(parts) if len(parts) > 1 else parts[0]
    collator = make_collator(model_config, cfg.model.whisper_processor_path)
    pairs = pair_sampler(train_set, cfg, rank, world) if cfg.data.pairs_file else None
    loader, sampler = build_loader(train_set, collator, cfg, rank, world, sampler=pairs,
                                   mix=[(r["samples"], r["weight"]) for r in mix])
    eval_data = None
    if eval_set is not None:
        # Evaluation keeps every sample (no dropping, no shuffling); ranks may differ by a micro-batch.
        eval_sampler = MicroBatchSampler(eval_set.lengths, rank, world, 1, cfg.train.seed,
                                         micro_batch_size=cfg.train.micro_batch_size, max_tokens=token_budget(cfg),
                                         shuffle=False, drop_remainder=False)
        eval_loader, _ = build_loader(eval_set, collator, cfg, rank, world, sampler=eval_sampler)
        eval_data = EvalData(eval_loader, eval_sampler, eval_loader.collate_fn)
    return Data(train_set, loader, sampler, eval_data, sum(len(p.bad) for p in prepared) + too_long, held_out)


def mix_report(manifests: list[tuple[str, float]], parts: list[CachedDataset],
               held_out: Optional[dict[str, set[str]]]) -> list[dict]:
    """Per training file: its training samples, weight, samples per epoch and share of the epoch (and how many
    data.eval_split held out). A weight that leaves a file out of every epoch is a config error."""
    rows = []
    for i, ((manifest, weight), part) in enumerate(zip(manifests, parts)):
        n = per_epoch(len(part), weight)
        if len(part) and not n:
            raise ConfigError(f"data.train_files[{i}].weight={weight:g} gives {manifest} ({len(part)} samples) no "
                              "sample per epoch (round(weight x samples) = 0): raise it")
        rows.append({"manifest": manifest, "samples": len(part), "weight": weight, "per_epoch": n})
        if held_out is not None:
            rows[-1]["held_out"] = len(held_out[manifest])
    total = sum(r["per_epoch"] for r in rows)
    for r in rows:
        r["share"] = r["per_epoch"] / total if total else 0.0
    return rows


def fit_max_tokens(dataset: CachedDataset, cfg: Config, manifest: str) -> int:
    """Samples longer than data.max_tokens fit no micro-batch: name their manifest lines before any training
    (DataError), or with data.skip_bad drop them from `dataset` and return how many."""
    limit = token_budget(cfg)
    if not limit:
        return 0
    long = np.flatnonzero(dataset.length_array() > limit).tolist()
    if not long:
        return 0
    bad = [{"source": dataset.source(i),
            "reason": f"{dataset.lengths[i]} tokens (text + audio frames), more than data.max_tokens={limit}"}
           for i in long]
    if not cfg.data.skip_bad:
        raise DataError(bad, f"{manifest}: longer than data.max_tokens={limit} fits (the longest needs "
                             f"{max(dataset.lengths)}: raise it)")
    dataset.drop(long)
    dist.print0(f"skipped {len(long)} sample(s) of {manifest} longer than data.max_tokens={limit}: "
                + ", ".join(b["source"] for b in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return len(long)


def pair_sampler(dataset: CachedDataset, cfg: Config, rank: int, world: int) -> PairSampler:
    """The training plan of a prepared pairs manifest (data.pairs_file): pairs, never split. A pair that lost a
    clip (skipped as bad, or longer than data.max_tokens) is left out and counted."""
    chosen, rejected, orphans = pair_indices(dataset.record_numbers())
    if orphans:
        dist.print0(f"data: {orphans} sample(s) of {cfg.data.pairs_file} left out: their pair lost its other clip")
    if not len(chosen):
        raise DataError([{"source": cfg.data.pairs_file, "reason": "no complete pair"}], cfg.data.pairs_file)
    return PairSampler(chosen, rejected, dataset.lengths, rank, world, cfg.train.grad_accum, cfg.train.seed,
                       micro_batch_size=cfg.train.micro_batch_size, max_tokens=token_budget(cfg))


def token_budget(cfg: Config) -> int:
    """data.max_tokens as a number: `auto` is resolved at start by train and bench-train (plan.resolve_max_tokens),
    which know the device; a command that reads it unresolved needs a number."""
    if cfg.data.max_tokens == "auto":
        raise ConfigError("data.max_tokens=auto is resolved by `ds-train train` on its device; this command needs a "
                          "number (`ds-train plan` prints the one auto picks)")
    return cfg.data.max_tokens


def train_sampler(dataset: CachedDataset, cfg: Config, rank: int, world: int,
                  mix: Optional[list[tuple[int, float]]] = None) -> MicroBatchSampler:
    """The training plan of `dataset` for `rank` of `world` (with `mix`: its files' (samples, weight))."""
    return MicroBatchSampler(dataset.lengths, rank, world, cfg.train.grad_accum, cfg.train.seed,
                             micro_batch_size=cfg.train.micro_batch_size, max_tokens=token_budget(cfg), mix=mix)


def build_loader(dataset: CachedDataset, collator, cfg, rank: int, world: int,
                 sampler: Optional[MicroBatchSampler] = None,
                 mix: Optional[list[tuple[int, float]]] = None) -> tuple[DataLoader, MicroBatchSampler]:
    """A loader over `sampler`, by default the training plan of `dataset` (with `mix`: its files' (samples,
    weight), see sampler.py)."""
    d = cfg.data
    if sampler is None:  # not `sampler or ...`: a sampler with no batch for this rank has len() 0 and is falsy
        sampler = train_sampler(dataset, cfg, rank, world, mix)
    kwargs = {}
    if d.num_workers > 0:
        kwargs = {"persistent_workers": d.persistent_workers, "prefetch_factor": d.prefetch_factor}
    # Its own generator: otherwise each iter(loader) draws a seed from the global RNG, and a resumed run (which
    # starts an iterator mid-epoch) would draw at a different point than an uninterrupted one.
    pairs = isinstance(sampler, PairSampler)
    collate = Collate(collator, pairs=pairs)
    loader = DataLoader(IndexedSamples(dataset) if pairs else dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=d.num_workers,
                        pin_memory=d.pin_memory and torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(cfg.train.seed), **kwargs)
    return loader, sampler
