"""`ds-train prepare`: check every sample, encode each audio once, write the sharded cache (data/cache.py) that
training reads. Every rank of the job takes every world_size-th shard; a re-run skips shards that are current.

Two passes. Pass 1 checks every record of every shard still to encode (schema, files, headers, a full decode for
corrupt/silent clips, text, tokenization) and fails with one report before any encoding starts; the decode is
read again in pass 2, a cost small next to encoding (see benchmarks/README.md). Pass 2 encodes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ds_train import dist
from ds_train.config import Config
from ds_train.data.audio import AudioError, audio_info, encode, load_audio, load_audio_tokenizer
from ds_train.data.cache import (cache_dirs, claim_cache, default_cache_dir, fingerprint, stored_bad, write_index,
                                 write_shard)
from ds_train.data.manifest import Record, audio_contents, read_manifest, tokenize
from ds_train.data.plausibility import plausibility_warnings
from ds_train.data.validate import check_record, clip_problem
from ds_train.errors import DataError
PROGRESS_EVERY_S = 30.0
CLIP_MEMO = 1024  # clips whose check / codes are remembered: a speaker's reference is shared by many records


@dataclass
class PrepareResult:
    cache_dir: Path
    num_samples: int
    manifest: str = ""
    bad: list[dict] = field(default_factory=list)
    no_trainable_audio: list[str] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # plausible-but-odd rows (plausibility.py)
    encoded_shards: int = 0
    seconds: float = 0.0


def prepare(cfg: Config, manifest: str, text_tokenizer, cache_dir: Optional[str] = None,
            audio_tokenizer=None) -> PrepareResult:
    """Prepare `manifest` into its cache. Every rank of the job takes every world_size-th shard."""
    t0 = time.time()
    cache = Path(cache_dir) if cache_dir else default_cache_dir(manifest)
    fp = fingerprint(cfg, text_tokenizer, cfg.model.audio_tokenizer_path)
    claim_cache(cache, fp)
    records = read_manifest(manifest, cfg.data.format, cfg.data.system_prompt)
    if not records:
        raise DataError([{"source": os.path.basename(manifest), "reason": "manifest has no records"}], manifest)
    warnings = [] if cfg.data.plausibility == "off" else plausibility_warnings(records)
    if warnings and cfg.data.plausibility == "error":
        raise DataError(warnings, f"{manifest} (implausible rows; data.plausibility=warn reports them and goes on)")
    size = cfg.data.shard_size
    shards = [records[i:i + size] for i in range(0, len(records), size)]
    mine = [k for k in range(len(shards)) if k % dist.world_size() == dist.rank()]
    limits = (cfg.data.min_audio_seconds, cfg.data.max_audio_seconds)
    stored = {k: stored_bad(cache, k, shards[k], fp, limits) for k in mine}  # None: missing or stale, to encode
    todo = [k for k in mine if stored[k] is None]

    # Pass 1: hours of encoding never start on a manifest that would fail.
    problem_of = functools.lru_cache(CLIP_MEMO)(functools.partial(clip_problem, cfg=cfg))
    found = {k: [b for b in (check_record(r, text_tokenizer, problem_of) for r in shards[k]) if b] for k in todo}
    bad = _gather_by_shard({**{k: stored[k] for k in mine if k not in found}, **found})
    n_todo = len(_gather_by_shard({k: [k] for k in todo}))
    dist.print0(f"prepare {manifest}: {len(records)} records, {len(bad)} bad; "
                f"{n_todo} of {len(shards)} shard(s) to encode")
    if bad and not cfg.data.skip_bad:
        raise DataError(bad, manifest)

    # Pass 2: decode, resample, encode, write the shards that are missing or stale.
    encode_bad = {}
    if todo:
        tok = audio_tokenizer or load_audio_tokenizer(cfg.model.audio_tokenizer_path, device=str(dist.device()),
                                                      semantic_model_path=cfg.model.semantic_model_path)
        cache.mkdir(parents=True, exist_ok=True)
        codes_of = functools.lru_cache(CLIP_MEMO)(
            functools.partial(encode_clip, audio_tokenizer=tok, loudness_normalize=cfg.data.loudness_normalize))
        last_print = time.time()
        for n, k in enumerate(todo, start=1):
            skip = {b["source"] for b in found[k]}
            entries, encode_bad[k] = [], []
            for rec in shards[k]:
                if rec.source in skip:
                    continue
                try:
                    entries.append(encode_record(rec, text_tokenizer, codes_of))
                except AudioError as e:  # changed since pass 1: reported with the rest, not a crash mid-run
                    encode_bad[k].append({"source": rec.source, "reason": str(e)})
            write_shard(cache, k, shards[k], fp, entries, found[k] + encode_bad[k])
            if time.time() - last_print > PROGRESS_EVERY_S:
                dist.print0(f"prepare: rank 0 encoded {n}/{len(todo)} of its shards ({time.time() - t0:.0f}s)")
                last_print = time.time()
    late_bad = _gather_by_shard(encode_bad)
    if late_bad and not cfg.data.skip_bad:
        raise DataError(late_bad, manifest)

    dist.barrier()
    result = PrepareResult(cache, 0, str(manifest), encoded_shards=n_todo, seconds=time.time() - t0)
    if dist.is_main():
        index = write_index(cache, fp, manifest, len(shards), limits)
        result.bad, result.num_samples = index["bad"], index["num_samples"]
        result.no_trainable_audio = index["no_trainable_audio"]
    dist.barrier()
    result = dist.broadcast_object(result)
    result.warnings = warnings
    if result.num_samples == 0:
        raise DataError(result.bad or [{"source": manifest, "reason": "no usable samples"}], manifest)
    return result


def prepare_all(cfg: Config, text_tokenizer) -> list[PrepareResult]:
    """Each training manifest's cache (data.train_file, or each of data.train_files in order), then the eval
    manifest's (when there is one), where cache_dirs() puts them."""
    train_caches, eval_cache = cache_dirs(cfg)
    results = [prepare(cfg, manifest, text_tokenizer, cache)
               for (manifest, _), cache in zip(cfg.data.manifests(), train_caches)]
    if cfg.data.eval_file:
        results.append(prepare(cfg, cfg.data.eval_file, text_tokenizer, eval_cache))
    return results


def write_report(out_dir: Path, results: list[PrepareResult], mix: Optional[list[dict]] = None) -> dict:
    """OUTPUT_DIR/data_report.json: every manifest with its cache and counts, every skipped sample with its
    reason, the counts the logs show, and the training mix (loader.py: each file's weight, samples per epoch and
    the samples data.eval_split held out) when given."""
    report = {
        "manifests": [{"manifest": r.manifest, "cache_dir": str(r.cache_dir), "samples": r.num_samples,
                       "skipped": len(r.bad)} for r in results],
        "skipped": sum(len(r.bad) for r in results),
        "samples": {str(r.cache_dir): r.num_samples for r in results},
        "bad": [{"manifest": r.manifest, **b} for r in results for b in r.bad],
        "no_trainable_audio": [s for r in results for s in r.no_trainable_audio],
        "warnings": [{"manifest": r.manifest, **w} for r in results for w in r.warnings],
    }
    if mix is not None:
        report["train_mix"] = mix
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "data_report.json").write_text(json.dumps(report, indent=1))
    if report["skipped"]:
        print(f"data: skipped {report['skipped']} bad sample(s) (data.skip_bad=true); see {out_dir}/data_report.json",
              flush=True)
    if report["warnings"]:
        shown = "; ".join(f"{w['source']}: {w['reason']}" for w in report["warnings"][:5])
        print(f"data: {len(report['warnings'])} warning(s): {shown}{' ...' if len(report['warnings']) > 5 else ''}; "
              f"see {out_dir}/data_report.json (data.plausibility=error stops on them)", flush=True)
    text_only = report["no_trainable_audio"]
    if text_only:
        print(f"data: {len(text_only)} sample(s) train no audio (text loss only), e.g. {', '.join(text_only[:5])}; "
              f"see {out_dir}/data_report.json", flush=True)
    return report


def encode_record(rec: Record, text_tokenizer, codes_of) -> dict:
    """The cache entry of one good record: token ids, labels, and the `codes_of(path)` of each clip."""
    input_ids, label_ids, trains_audio = tokenize(rec.sample, text_tokenizer)
    paths = [clip.audio_url for clip in audio_contents(rec.sample)]
    codes = [codes_of(p) for p in paths]
    starts = np.cumsum([0] + [c.shape[1] for c in codes[:-1]])
    return {
        "source": rec.source,
        "key": rec.key,
        "input_ids": torch.tensor(input_ids, dtype=torch.int32),
        "label_ids": torch.tensor(label_ids, dtype=torch.int32),
        "audio_codes": torch.cat(codes, dim=1),
        "audio_starts": torch.tensor(starts, dtype=torch.int64),
        "audio_paths": paths,
        "clip_seconds": [audio_info(p)[1] for p in paths],  # duration limits are applied to these at load
        "trains_audio": trains_audio,
    }


def encode_clip(path: str, audio_tokenizer, loudness_normalize: bool) -> torch.Tensor:
    """Decode, downmix, resample, encode: codes (n_q, T) as int16 (codes < 1024 fit; a quarter of int64's bytes)."""
    wav = load_audio(path, audio_tokenizer.sampling_rate)
    return encode(audio_tokenizer, wav, loudness_normalize).to(torch.int16)


def _gather_by_shard(per_shard: dict[int, list]) -> list:
    """Every rank's {shard: items}, concatenated in shard order (= manifest order) on every rank."""
    import torch.distributed as tdist

    parts = [per_shard]
    if tdist.is_initialized():
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, per_shard)
    merged = {k: v for part in parts for k, v in part.items()}
    return [x for k in sorted(merged) for x in merged[k]]
