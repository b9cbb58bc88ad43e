"""`ds-train bench-data CONFIG`: what the prepared cache and token-budget batching buy, measured on one data set.

1. Throughput of the training loader reading the cache vs a loader that decodes and encodes every sample on the fly
   (the same manifest, audio and collator functions, the same micro-batches), in samples/s and tokens/s.
2. Padding efficiency (real / padded positions) of token-budget micro-batches vs random fixed-size ones holding the
   same mean number of samples.
3. The cost of prepare's check pass (headers + one decode per clip) next to its encode pass.

Numbers go to stdout and OUTPUT_DIR/bench_data.json. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ds_train import dist
from ds_train.config import Config
from ds_train.data.cache import CachedDataset
from ds_train.data.collate import make_collator, to_dataset_sample
from ds_train.data.loader import build_loader, token_budget
from ds_train.data.manifest import read_manifest
from ds_train.data.prepare import encode_clip, encode_record, prepare
from ds_train.data.sampler import MicroBatchSampler
from ds_train.data.validate import clip_problem
from ds_train.errors import ConfigError

CACHE_MIN_SECONDS = 3.0  # repeat cache epochs until at least this long, so the rate is not a startup artefact


class OnTheFlyDataset(Dataset):
    """The cache's samples made at access time: tokenize, decode, resample, encode (no memo), as a loader
    without a cache would. Index i is the cache's sample i."""

    def __init__(self, records, text_tokenizer, audio_tokenizer, model_config, loudness_normalize: bool, whisper: bool):
        self.records, self.text_tokenizer = records, text_tokenizer
        self.codes_of = functools.partial(encode_clip, audio_tokenizer=audio_tokenizer,
                                          loudness_normalize=loudness_normalize)
        self.ids = (model_config.audio_in_token_idx, model_config.audio_out_token_idx)
        self.whisper = whisper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        entry = encode_record(self.records[i], self.text_tokenizer, self.codes_of)
        return to_dataset_sample(entry, *self.ids, self.whisper)


def bench_data(cfg: Config, on_the_fly_seconds: float = 60.0) -> dict:
    """Run the three measurements on cfg.data.train_file; print them and return them as a dict."""
    from ds_train.data.audio import load_audio_tokenizer
    from ds_train.preflight import preflight

    if cfg.data.train_files is not None:
        raise ConfigError("bench-data measures one manifest: set data.train_file, not data.train_files")
    pre = preflight(cfg, for_prepare=True)
    model_config, text_tokenizer, out = pre.model_config, pre.text_tokenizer, pre.out_dir
    audio_tokenizer = load_audio_tokenizer(cfg.model.audio_tokenizer_path, device=str(dist.device()),
                                           semantic_model_path=cfg.model.semantic_model_path)
    t0 = time.perf_counter()
    prepared = prepare(cfg, cfg.data.train_file, text_tokenizer, cfg.data.cache_dir, audio_tokenizer=audio_tokenizer)
    prepare_s = time.perf_counter() - t0
    whisper = bool(model_config.encode_whisper_embed)
    cached = CachedDataset(prepared.cache_dir, model_config, whisper)
    collator = make_collator(model_config, cfg.model.whisper_processor_path)
    lengths = cached.lengths

    # Padding efficiency.
    max_tokens = token_budget(cfg) or max(max(lengths), 16 * int(np.median(lengths)))
    by_tokens = MicroBatchSampler(lengths, 0, 1, 1, cfg.train.seed, max_tokens=max_tokens)
    per_batch = len(lengths) / len(by_tokens.plan())
    fixed_size = max(1, round(per_batch))
    by_count = MicroBatchSampler(lengths, 0, 1, 1, cfg.train.seed, micro_batch_size=fixed_size)
    padding = {"max_tokens": max_tokens, "token_budget": by_tokens.padding_efficiency(),
               "token_budget_samples_per_batch": per_batch, "fixed_size": fixed_size,
               "fixed_size_random": by_count.padding_efficiency()}

    # Throughput: the same micro-batches, read from the cache vs made on the fly.
    loader, sampler = build_loader(cached, collator, cfg, 0, 1, sampler=by_tokens)
    cache_rate, cache_first = _measure(loader, sampler, CACHE_MIN_SECONDS, epochs=None)
    by_key = {r.key: r for r in read_manifest(cfg.data.train_file, cfg.data.format, cfg.data.system_prompt,
                                                  columns=cfg.data.columns)}
    fly = OnTheFlyDataset([by_key[e["key"]] for e in cached.entries], text_tokenizer, audio_tokenizer, model_config,
                          cfg.data.loudness_normalize, whisper)
    fly_loader, fly_sampler = build_loader(fly, collator, cfg, 0, 1, sampler=by_tokens)
    fly_rate, fly_first = _measure(fly_loader, fly_sampler, on_the_fly_seconds, epochs=1)
    same = all(_equal(cache_first.inputs[k], fly_first.inputs[k]) for k in cache_first.inputs)
    same = same and _equal(cache_first.label_audio_ids, fly_first.label_audio_ids)

    # Prepare's check pass: header + full decode of every clip, no memo, next to the encode cost per sample.
    t0 = time.perf_counter()
    clips = [p for e in cached.entries for p in e["audio_paths"]]
    for p in clips:
        clip_problem(p, cfg)
    check_s = time.perf_counter() - t0

    result = {
        "data": cfg.data.train_file, "samples": len(cached), "num_workers": cfg.data.num_workers,
        "prepare_s": prepare_s, "prepare_encoded_shards": prepared.encoded_shards,
        "cache": cache_rate, "on_the_fly": fly_rate,
        "speedup_samples_per_s": cache_rate["samples_per_s"] / fly_rate["samples_per_s"],
        "on_the_fly_batches_equal_cache": same,
        "padding_efficiency": padding,
        "check_pass_s_per_sample": check_s / len(cached),
        "on_the_fly_s_per_sample": 1.0 / fly_rate["samples_per_s"],
    }
    _print(result)
    (Path(out) / "bench_data.json").write_text(json.dumps(result, indent=1))
    return result


def _measure(loader, sampler: MicroBatchSampler, min_seconds: float, epochs):
    """Rates over whole epochs until `min_seconds` have passed (epochs=None), or over at most `epochs` epochs cut
    at `min_seconds`; and the first batch, to check both loaders made the same one."""
    samples = tokens = batches = 0
    first = None
    t0 = time.perf_counter()
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            first = first or batch
            samples += batch.num_samples
            tokens += batch.num_tokens
            batches += 1
            if time.perf_counter() - t0 >= min_seconds and epochs is not None:
                break
        epoch += 1
        seconds = time.perf_counter() - t0
        if seconds >= min_seconds or (epochs is not None and epoch >= epochs):
            break
    sampler.set_epoch(0)
    return {"samples": samples, "batches": batches, "seconds": seconds, "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds}, first


def _equal(x, y) -> bool:
    if x is None or y is None:
        return x is y
    return bool((x == y).all()) and x.shape == y.shape


def _print(r: dict) -> None:
    c, f, p = r["cache"], r["on_the_fly"], r["padding_efficiency"]
    print(f"bench-data {r['data']}: {r['samples']} samples, data.num_workers={r['num_workers']}")
    print(f"  prepare (encode {r['prepare_encoded_shards']} shard(s)): {r['prepare_s']:.1f}s")
    print(f"  loader from cache:   {c['samples_per_s']:10.1f} samples/s {c['tokens_per_s']:12.0f} tokens/s "
          f"({c['samples']} samples in {c['seconds']:.1f}s)")
    print(f"  loader on the fly:   {f['samples_per_s']:10.2f} samples/s {f['tokens_per_s']:12.0f} tokens/s "
          f"({f['samples']} samples in {f['seconds']:.1f}s)")
    print(f"  cache / on the fly:  {r['speedup_samples_per_s']:.0f}x samples/s; same batches: "
          f"{r['on_the_fly_batches_equal_cache']}")
    print(f"  padding efficiency:  token budget {p['token_budget']:.3f} (data.max_tokens={p['max_tokens']}, "
          f"{p['token_budget_samples_per_batch']:.1f} samples/batch) vs random fixed-size {p['fixed_size_random']:.3f} "
          f"({p['fixed_size']} samples/batch)")
    print(f"  prepare check pass:  {r['check_pass_s_per_sample'] * 1e3:.1f} ms/sample (header + decode) vs "
          f"{r['on_the_fly_s_per_sample'] * 1e3:.0f} ms/sample to decode + encode")
