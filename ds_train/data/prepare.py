"""`ds-train prepare`: check every sample, encode each audio once, write the sharded cache (data/cache.py) that
training reads. A re-run skips shards that are current.

Two passes. Pass 1 checks every record of every shard still to encode (schema, files, headers, a full decode for
corrupt/silent clips, text, tokenization) and fails with one report before any encoding starts; the decode is
read again in pass 2, a cost small next to encoding (see benchmarks/README.md). Pass 2 encodes (encoder.py: the audio
tokenizer on the rank's device; clips decoded ahead in data.decode_workers processes when > 0).

Sharing the work: both passes give each rank an even, contiguous part of the records still to do, whatever the shard
boundaries (26 samples in one shard on 2 ranks: 13 each). Pass 2 goes in rounds. In each, every rank locks one shard
still to encode (shard-K.lock); all ranks encode their part of the locked shards' records into piece files; then each
lock holder assembles its shard from the pieces (the shard one process would write) and releases the lock. A shard
locked by another run on the same cache (a second `prepare` or `train` job) is skipped and, once the rest is done,
waited for: it is never encoded twice. Pieces left by an interrupted run are reused.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from filelock import SoftFileLease, Timeout

from ds_train import dist
from ds_train.config import Config
from ds_train.data.audio import AudioError, audio_info, load_audio_tokenizer
from ds_train.data import formats
from ds_train.data.cache import (DigestMemo, assemble_shard, cache_dirs, claim_cache, current_index, default_cache_dir,
                                 fingerprint, lock_path, read_pieces, stored_bad, write_index, write_piece)
from ds_train.data.encoder import CLIP_MEMO, ClipCodes, encode_clip  # noqa: F401 (encode_clip: part of this API)
from ds_train.data.manifest import Record, audio_contents, read_manifest, tokenize
from ds_train.data.pairs import write_pairs_manifest
from ds_train.data.plausibility import plausibility_warnings
from ds_train.data.validate import check_record, clip_problem
from ds_train.errors import DataError
PROGRESS_EVERY_S = 30.0
# A shard lock whose holder stopped refreshing it (a thread does, every third of this) for this long is taken over;
# one whose holder process is gone (same host) at once. Generous: NFS may show a refresh a minute late.
LOCK_LEASE_S = 300.0
WAIT_POLL_S = 2.0  # how often a run waiting for another run's shard looks again


@dataclass
class PrepareResult:
    cache_dir: Path
    num_samples: int
    manifest: str = ""
    bad: list[dict] = field(default_factory=list)
    no_trainable_audio: list[str] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # plausible-but-odd rows (plausibility.py)
    encoded_shards: int = 0  # shards this run wrote (not those another run wrote meanwhile)
    encoded_samples: list[int] = field(default_factory=list)  # records each rank of this run encoded
    seconds: float = 0.0


def prepare(cfg: Config, manifest: str, text_tokenizer, cache_dir: Optional[str] = None,
            audio_tokenizer=None) -> PrepareResult:
    """Prepare `manifest` into its cache, the work shared by all ranks of the job (see the module docstring)."""
    t0 = time.time()
    cache = Path(cache_dir) if cache_dir else default_cache_dir(manifest)
    fp = fingerprint(cfg, text_tokenizer, cfg.model.audio_tokenizer_path)
    limits = (cfg.data.min_audio_seconds, cfg.data.max_audio_seconds)
    if not formats.exists(manifest):
        raise FileNotFoundError(f"manifest not found: {manifest}")
    columns = dict(cfg.data.columns or {})
    sha1 = formats.source_digest(manifest, formats.kind_of(manifest, cfg.data.format), columns)
    # A relaunch: the manifest's bytes and the fingerprint are those of a complete cache. Nothing is checked and no
    # audio opened (the audio may not even be here: a cache shipped with its manifest trains).
    index = current_index(cache, fp, sha1, limits, cfg.data.plausibility)
    if all(dist.all_gather_object(index is not None)):  # every rank takes the same path
        return _from_index(cfg, cache, manifest, index, t0)
    claim_cache(cache, fp)
    digests = DigestMemo(cache)
    records = read_manifest(manifest, cfg.data.format, cfg.data.system_prompt, digest=digests, columns=columns)
    if not records:
        raise DataError([{"source": os.path.basename(manifest), "reason": "manifest has no records"}], manifest)
    warnings = [] if cfg.data.plausibility == "off" else plausibility_warnings(records, digests.seconds)
    if warnings and cfg.data.plausibility == "error":
        raise DataError(warnings, f"{manifest} (implausible rows; data.plausibility=warn reports them and goes on)")
    size = cfg.data.shard_size
    shards = [records[i:i + size] for i in range(0, len(records), size)]
    looked = {k: stored_bad(cache, k, shards[k], fp, limits)  # None: missing or stale, to encode
              for k in range(dist.rank(), len(shards), dist.world_size())}
    stored = {k: v for part in dist.all_gather_object(looked) for k, v in part.items()}
    todo = [k for k in range(len(shards)) if stored[k] is None]

    # Pass 1: hours of encoding never start on a manifest that would fail.
    problem_of = functools.lru_cache(CLIP_MEMO)(functools.partial(clip_problem, cfg=cfg))
    mine = _my_part([(k, i) for k in todo for i in range(len(shards[k]))])
    checked = [(k, i, b) for k, i in mine if (b := check_record(shards[k][i], text_tokenizer, problem_of))]
    found = {k: {} for k in todo}  # {shard: {index: bad}} of the records pass 1 rejected
    for k, i, b in sorted(itertools.chain(*dist.all_gather_object(checked)), key=lambda x: x[:2]):
        found[k][i] = b
    bad = [b for k in range(len(shards)) for b in (stored[k] if k not in found else found[k].values())]
    dist.print0(f"prepare {manifest}: {len(records)} records, {len(bad)} bad; "
                f"{len(todo)} of {len(shards)} shard(s) to encode")
    if bad and not cfg.data.skip_bad:
        raise DataError(bad, manifest)

    # Pass 2: decode and resample (here or in data.decode_workers processes), encode, write missing or stale shards.
    written, encoded, failed = [], 0, []
    if todo:
        tok = audio_tokenizer or load_audio_tokenizer(cfg.model.audio_tokenizer_path, device=str(dist.device()),
                                                      semantic_model_path=cfg.model.semantic_model_path)
        clips = ClipCodes(tok, cfg.data.loudness_normalize, cfg.data.decode_workers, cfg.data.encode_batch)
        encode_one = functools.partial(encode_record, text_tokenizer=text_tokenizer, codes_of=clips)
        written, encoded, failed = _Rounds(cache, shards, fp, limits, encode_one, clips.encode).run(todo, found, t0)
    counts = dist.all_gather_object(encoded)
    if todo:
        by_others = len(todo) - len(written)
        dist.print0(f"prepare: encoded {sum(counts)} sample(s) into {len(written)} shard(s) in "
                    f"{time.time() - t0:.1f}s; per rank: {', '.join(map(str, counts))}"
                    + (f"; {by_others} shard(s) written by another run" if by_others else ""))
    late_bad = [b for k, b in sorted(itertools.chain(*dist.all_gather_object(failed)), key=lambda x: x[0])]
    if late_bad and not cfg.data.skip_bad:
        raise DataError(late_bad, manifest)

    dist.barrier()
    result = PrepareResult(cache, 0, str(manifest), encoded_shards=len(written), encoded_samples=counts,
                           seconds=time.time() - t0)
    if dist.is_main():
        index = write_index(cache, fp, manifest, len(shards), limits, sha1, warnings, cfg.data.plausibility,
                            _parts(records))
        digests.save()  # with the index: a run that stops on bad data leaves the cache as it found it
        result.bad, result.num_samples = index["bad"], index["num_samples"]
        result.no_trainable_audio = index["no_trainable_audio"]
    dist.barrier()
    result = dist.broadcast_object(result)
    result.warnings = warnings
    if result.num_samples == 0:
        raise DataError(result.bad or [{"source": manifest, "reason": "no usable samples"}], manifest)
    return result


def _parts(records: list[Record]) -> list[list]:
    """[file, first record number] of each file of the data set, for the cache to name samples FILE:N."""
    parts = []
    for rec in records:
        name, _, n = rec.source.rpartition(":")
        if not parts or parts[-1][0] != name:
            parts.append([name, rec.order - int(n)])
    return parts


def _from_index(cfg: Config, cache: Path, manifest: str, index: dict, t0: float) -> PrepareResult:
    """The result of a prepare with nothing to do, from the cache's index; the same errors a full run gives."""
    if index["warnings"] and cfg.data.plausibility == "error":
        raise DataError(index["warnings"], f"{manifest} (implausible rows; data.plausibility=warn reports them and "
                                           "goes on)")
    if index["bad"] and not cfg.data.skip_bad:
        raise DataError(index["bad"], manifest)
    if index["num_samples"] == 0:
        raise DataError(index["bad"] or [{"source": manifest, "reason": "no usable samples"}], manifest)
    dist.print0(f"prepare {manifest}: cache {cache} is current (manifest and fingerprint unchanged): "
                f"{index['num_samples']:,} samples, {len(index['bad'])} bad")
    return PrepareResult(cache, index["num_samples"], str(manifest), bad=index["bad"],
                         no_trainable_audio=index["no_trainable_audio"], warnings=index["warnings"],
                         encoded_samples=[0] * dist.world_size(), seconds=time.time() - t0)


def prepare_all(cfg: Config, text_tokenizer) -> list[PrepareResult]:
    """Each training manifest's cache (data.train_file, or each of data.train_files in order), then the eval
    manifest's (when there is one), where cache_dirs() puts them. data.pairs_file is expanded into its manifest
    first (ds_train.data.pairs)."""
    if cfg.data.pairs_file:
        write_pairs_manifest(cfg)
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
    audio_in, audio_out = text_tokenizer.convert_tokens_to_ids(["<|AUDIO|>", "<|AUDIO_OUT|>"])
    kinds = [t for t in input_ids if t in (audio_in, audio_out)]  # one audio token per clip, in clip order
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
        "clip_is_out": [t == audio_out for t in kinds],  # audio-out clips are merged into the sequence (its length)
        "order": rec.order,
    }


def _my_part(work: list) -> list:
    """This rank's contiguous, even part of `work` (parts differ by one item at most)."""
    rank, world = dist.rank(), dist.world_size()
    return work[rank * len(work) // world:(rank + 1) * len(work) // world]


def shard_lease(cache: Path, k: int) -> SoftFileLease:
    """The lock on encoding shard k. filelock's lease: created with O_CREAT|O_EXCL (safe on network file systems,
    where flock may not be), naming its holder's pid and host, refreshed by a thread while held."""
    return SoftFileLease(str(lock_path(cache, k)), lease_duration=LOCK_LEASE_S)


class _Rounds:
    """Pass 2: rounds of lock, encode, assemble, until every shard to do is written, by this run or another."""

    def __init__(self, cache: Path, shards: list[list[Record]], fp: dict, limits, encode_one, encode_clips):
        self.cache, self.shards, self.fp, self.limits, self.encode_one = cache, shards, fp, limits, encode_one
        self.encode_clips = encode_clips  # ClipCodes.encode: the part's clips, decoded ahead, before its records
        self.leases: dict[int, SoftFileLease] = {}  # kept across rounds: a lease times a silent holder

    def run(self, todo: list[int], found: dict[int, dict], t0: float) -> tuple[list[int], int, list[tuple]]:
        """(shards this run wrote, records this rank encoded, (shard, bad) of the records that failed to encode)."""
        written, encoded, failed = [], 0, []
        pending, last_print, last_wait, waiting_since = list(todo), time.time(), 0.0, None
        try:
            while pending:
                seen = {k: v for part in dist.all_gather_object(self.lock_round(pending)) for k, v in part.items()}
                held = sorted(k for k, v in seen.items() if v[0] == "held")
                pending = [k for k in pending if seen.get(k, ("busy",))[0] == "busy"]
                for k in held:
                    if seen[k][2]:
                        dist.print0(seen[k][2])
                work = [(k, i) for k in held for i in range(len(self.shards[k]))
                        if i not in found[k] and i not in seen[k][1]]
                encoded += self.encode_part(_my_part(work))
                dist.barrier()  # every piece of the round is written
                for k in held:
                    if k % dist.world_size() == dist.rank():  # the lock holder
                        failed += [(k, b) for b in assemble_shard(self.cache, k, self.shards[k], self.fp, found[k])]
                        self.leases[k].release()
                written += held
                waiting_since = None if held else waiting_since
                if held and time.time() - last_print > PROGRESS_EVERY_S:
                    dist.print0(f"prepare: {len(written)}/{len(todo)} shard(s) written ({time.time() - t0:.0f}s)")
                    last_print = time.time()
                if pending and not held:  # what is left is another run's: wait for it, saying so now and then
                    waiting_since = waiting_since or time.time()
                    if time.time() - last_wait > PROGRESS_EVERY_S:
                        dist.print0(self.waiting_line(seen, pending, time.time() - waiting_since))
                        last_wait = time.time()
                    time.sleep(WAIT_POLL_S)
        finally:  # also on an error: never leave a lock of a live process behind
            for lease in self.leases.values():
                if lease.is_locked:
                    lease.release()
        return written, encoded, failed

    def lock_round(self, pending: list[int]) -> dict[int, tuple]:
        """This rank's look at the pending shards it owns (every world_size-th), until it locks one: ("done",) for a
        shard another run wrote since, ("busy", holder) for one another run holds, ("held", indices already in
        pieces, takeover note) for the one it locked."""
        seen = {}
        for k in pending:
            if k % dist.world_size() != dist.rank():
                continue
            lease = self.leases.setdefault(k, shard_lease(self.cache, k))
            before = lease.owner
            try:
                lease.acquire(timeout=0)
            except Timeout:
                seen[k] = ("busy", _holder(lease.owner or before))
                continue
            if stored_bad(self.cache, k, self.shards[k], self.fp, self.limits) is not None:  # the holder wrote it
                lease.release()
                seen[k] = ("done",)
                continue
            note = (f"prepare: took over the lock {lock_path(self.cache, k)} of {_holder(before)} (gone, or silent "
                    f"for {LOCK_LEASE_S:.0f}s)") if before else ""
            seen[k] = ("held", set(read_pieces(self.cache, k, self.shards[k], self.fp)), note)
            break
        return seen

    def encode_part(self, part: list[tuple[int, int]]) -> int:
        """Encode this rank's (shard, index) records of a round into one piece file per shard; returns their count."""
        self.encode_clips(clip.audio_url for k, i in part for clip in audio_contents(self.shards[k][i].sample))
        for k, items in itertools.groupby(part, key=lambda x: x[0]):
            done = []
            for _, i in items:
                rec = self.shards[k][i]
                try:
                    done.append((i, rec.key, self.encode_one(rec), None))
                except AudioError as e:  # changed since pass 1: reported with the rest, not a crash mid-run
                    done.append((i, rec.key, None, {"source": rec.source, "reason": str(e)}))
            write_piece(self.cache, k, self.fp, done)
        return len(part)

    def waiting_line(self, seen: dict[int, tuple], pending: list[int], seconds: float) -> str:
        k = pending[0]  # every pending shard is busy in a round that locked none
        more = f" and {len(pending) - 1} more" if len(pending) > 1 else ""
        return (f"prepare: waiting for shard {k}{more}, which another run is encoding ({seen[k][1]}; lock "
                f"{lock_path(self.cache, k)}; {seconds:.0f}s so far)")


def _holder(owner) -> str:
    return f"pid {owner.pid} on {owner.hostname}" if owner else "an unknown holder"
