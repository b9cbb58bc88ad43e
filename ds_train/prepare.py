"""`ds-train prepare`: check every sample, encode each audio once, write a sharded cache training reads.

cache_dir/
  fingerprint.json    what produces the codes (tokenizers, settings); written before any shard
  index.json          fingerprint, shard count, sample count, bad-sample report; written last
  shard-00000.pt ...  records [k*S, (k+1)*S) of the manifest: token ids, labels, audio codes, provenance

Shard k always holds the same records whatever the number of ranks, so a cache made by 8 processes equals one made
by 1. A re-run skips shards whose record keys and fingerprint match; a cache made with other settings is an error,
never a silent mix.

Two passes. Pass 1 checks every record of every shard still to encode (schema, files, headers, a full decode for
corrupt/silent clips, text, tokenization) and fails with one report before any encoding starts; the decode is
read again in pass 2, a cost small next to encoding (see benchmarks/README.md). Pass 2 encodes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ds_train import dist
from ds_train.audio import AudioError, audio_info, encode, load_audio, load_audio_tokenizer, tokenizer_fingerprint
from ds_train.config import Config, flatten
from ds_train.manifest import Record, audio_contents, read_manifest, text_of

CACHE_VERSION = 2
SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below this carries no speech
MIN_SOURCE_RATE = 8000  # below this, resampling up cannot recover what the tokenizer expects
LOUDNESS_BLOCK_SECONDS = 0.4  # pyloudnorm measures in 400 ms blocks and raises on a shorter clip
PROGRESS_EVERY_S = 30.0
CLIP_MEMO = 1024  # clips whose check / codes are remembered: a speaker's reference is shared by many records


class DataError(ValueError):
    """One report of every bad sample (manifest, line, reason)."""

    def __init__(self, bad: list[dict], where: str):
        self.bad = bad
        lines = [f"  {b['source']}: {b['reason']}" for b in bad[:50]]
        more = [f"  ... and {len(bad) - 50} more"] if len(bad) > 50 else []
        super().__init__(
            f"{len(bad)} bad sample(s) in {where}:\n" + "\n".join(lines + more)
            + "\nFix them, or set data.skip_bad=true to skip and count them (report: OUTPUT_DIR/data_report.json)."
        )


class CacheMismatchError(DataError):
    """The cache was made with other settings or tokenizers: reusing it would mix codes of two setups."""

    def __init__(self, cache: Path, changes: list[str]):
        self.bad = []
        ValueError.__init__(self, f"cache {cache} was made with a different {'; '.join(changes)}.\n"
                                  "Delete it to rebuild, or set data.cache_dir to a new folder.")


@dataclass
class PrepareResult:
    cache_dir: Path
    num_samples: int
    manifest: str = ""
    bad: list[dict] = field(default_factory=list)
    no_trainable_audio: list[str] = field(default_factory=list)
    encoded_shards: int = 0
    seconds: float = 0.0


def default_cache_dir(manifest: str) -> Path:
    p = Path(manifest).resolve()
    return p.parent / ".ds_train_cache" / p.stem


def fingerprint(cfg: Config, text_tokenizer, audio_tokenizer_path: str) -> dict:
    vocab = json.dumps(sorted(text_tokenizer.get_vocab().items()))
    d = cfg.data
    return {
        "version": CACHE_VERSION,
        "audio_tokenizer": tokenizer_fingerprint(audio_tokenizer_path),
        "text_tokenizer": hashlib.sha1(vocab.encode()).hexdigest(),
        "settings": {"format": d.format, "system_prompt": d.system_prompt, "max_audio_seconds": d.max_audio_seconds,
                     "min_audio_seconds": d.min_audio_seconds, "loudness_normalize": d.loudness_normalize,
                     "shard_size": d.shard_size},
    }


def prepare(cfg: Config, manifest: str, text_tokenizer, cache_dir: Optional[str] = None,
            audio_tokenizer=None) -> PrepareResult:
    """Prepare `manifest` into its cache. Every rank of the job takes every world_size-th shard."""
    t0 = time.time()
    cache = Path(cache_dir) if cache_dir else default_cache_dir(manifest)
    fp = fingerprint(cfg, text_tokenizer, cfg.model.audio_tokenizer_path)
    _claim_cache(cache, fp)
    records = read_manifest(manifest, cfg.data.format, cfg.data.system_prompt)
    if not records:
        raise DataError([{"source": os.path.basename(manifest), "reason": "manifest has no records"}], manifest)
    size = cfg.data.shard_size
    shards = [records[i:i + size] for i in range(0, len(records), size)]
    mine = [k for k in range(len(shards)) if k % dist.world_size() == dist.rank()]
    stored = {k: _stored_bad(cache, k, shards[k], fp) for k in mine}  # None: missing or stale, to encode
    todo = [k for k in mine if stored[k] is None]

    # Pass 1: hours of encoding never start on a manifest that would fail.
    problem_of = functools.lru_cache(CLIP_MEMO)(functools.partial(clip_problem, cfg=cfg))
    found = {k: [b for b in (_check(r, text_tokenizer, problem_of) for r in shards[k]) if b] for k in todo}
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
            _write_shard(cache, k, shards[k], fp, entries, found[k] + encode_bad[k])
            if time.time() - last_print > PROGRESS_EVERY_S:
                dist.print0(f"prepare: rank 0 encoded {n}/{len(todo)} of its shards ({time.time() - t0:.0f}s)")
                last_print = time.time()
    late_bad = _gather_by_shard(encode_bad)
    if late_bad and not cfg.data.skip_bad:
        raise DataError(late_bad, manifest)

    dist.barrier()
    result = PrepareResult(cache, 0, str(manifest), encoded_shards=n_todo, seconds=time.time() - t0)
    if dist.is_main():
        index = _write_index(cache, fp, manifest, len(shards))
        result.bad, result.num_samples = index["bad"], index["num_samples"]
        result.no_trainable_audio = index["no_trainable_audio"]
    dist.barrier()
    result = dist.broadcast_object(result)
    if result.num_samples == 0:
        raise DataError(result.bad or [{"source": manifest, "reason": "no usable samples"}], manifest)
    return result


def write_report(out_dir: Path, results: list[PrepareResult]) -> dict:
    """OUTPUT_DIR/data_report.json: every skipped sample with its reason, and the counts the logs show."""
    report = {
        "skipped": sum(len(r.bad) for r in results),
        "samples": {str(r.cache_dir): r.num_samples for r in results},
        "bad": [{"manifest": r.manifest, **b} for r in results for b in r.bad],
        "no_trainable_audio": [s for r in results for s in r.no_trainable_audio],
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "data_report.json").write_text(json.dumps(report, indent=1))
    if report["skipped"]:
        print(f"data: skipped {report['skipped']} bad sample(s) (data.skip_bad=true); see {out_dir}/data_report.json",
              flush=True)
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
        "trains_audio": trains_audio,
    }


def encode_clip(path: str, audio_tokenizer, loudness_normalize: bool) -> torch.Tensor:
    """Decode, downmix, resample, encode: codes (n_q, T) as int16 (codes < 1024 fit; a quarter of int64's bytes)."""
    wav = load_audio(path, audio_tokenizer.sampling_rate)
    return encode(audio_tokenizer, wav, loudness_normalize).to(torch.int16)


def tokenize(sample, text_tokenizer) -> Optional[tuple[list[int], list[int], bool]]:
    """(input_ids, label_ids, trains_audio) by boson's `prepare_chatml_sample`; None when it cannot tokenize."""
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    input_ids, label_ids, _, _ = prepare_chatml_sample(sample, text_tokenizer)
    if input_ids is None:
        return None
    audio_out = text_tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>")
    # The collator trains an audio-out segment only when its <|AUDIO_OUT|> token carries a label.
    trains_audio = any(t == audio_out and label >= 0 for t, label in zip(input_ids, label_ids))
    return input_ids, label_ids, trains_audio


def _check(rec: Record, text_tokenizer, problem_of) -> Optional[dict]:
    """None for a usable record, {"source", "reason"} for a bad one."""

    def bad(reason):
        return {"source": rec.source, "reason": reason}

    if rec.error:
        return bad(rec.error)
    for text in text_of(rec.sample):
        if not text.strip():
            return bad("empty text")
    clips = audio_contents(rec.sample)
    if not clips:
        return bad("no audio in sample")
    for clip in clips:
        problem = problem_of(clip.audio_url)
        if problem:
            return bad(f"{problem}: {clip.audio_url}")
    tokens = tokenize(rec.sample, text_tokenizer)
    if tokens is None:  # boson's helper prints the exception and returns None
        return bad("could not be tokenized (see the message printed above)")
    if all(t < 0 for t in tokens[1]):
        return bad("nothing to train on: every label is masked (check start_index and the assistant turns)")
    return None


def clip_problem(path: str, cfg: Config) -> Optional[str]:
    """Why this audio file cannot be trained on, or None. Header checks first, then one full decode."""
    d = cfg.data
    if not os.path.isfile(path):
        return "audio file not found"
    try:
        sr, seconds = audio_info(path)
    except AudioError as e:
        return str(e)
    if sr < MIN_SOURCE_RATE:
        return f"sample rate {sr} Hz is below the {MIN_SOURCE_RATE} Hz the audio tokenizer can take"
    if seconds > d.max_audio_seconds:  # from the header: a two-hour file is not decoded to learn this
        return f"audio is {seconds:.1f}s, longer than data.max_audio_seconds={d.max_audio_seconds}"
    missing = _wav_missing_bytes(path)
    if missing:
        return f"truncated WAV: its header promises {missing} more bytes of audio than the file holds"
    try:
        wav = load_audio(path, sr)  # decode only (mono); the rate is already the file's
    except AudioError as e:
        return str(e)
    seconds = len(wav) / sr
    if not np.isfinite(wav).all():
        return "audio contains NaN or infinite samples"
    peak = float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        return f"audio is silent (peak {peak:.1e} < {SILENCE_PEAK:.0e})"
    if seconds < d.min_audio_seconds:
        return f"audio is {seconds:.3f}s, shorter than data.min_audio_seconds={d.min_audio_seconds}"
    if d.loudness_normalize and seconds <= LOUDNESS_BLOCK_SECONDS:
        return f"audio is {seconds:.3f}s, too short for data.loudness_normalize (needs > {LOUDNESS_BLOCK_SECONDS}s)"
    return None


def _wav_missing_bytes(path: str) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares but does not hold (0 for a whole file or another format).

    libsndfile reads a truncated WAV without complaint, as a shorter clip whose transcript no longer matches.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return 0
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                if size in (0, 0xFFFFFFFF):  # streaming writers leave the size open
                    return 0
                return max(0, size - (os.path.getsize(path) - f.tell()))
            f.seek(size + (size & 1), os.SEEK_CUR)


def _fingerprint_hash(fp: dict) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _shard_path(cache: Path, k: int) -> Path:
    return cache / f"shard-{k:05d}.pt"


def _stored_bad(cache: Path, k: int, records: list[Record], fp: dict) -> Optional[list[dict]]:
    """The bad-sample list of shard k when it is current (same records, same fingerprint); None when not."""
    p = _shard_path(cache, k)
    if not p.is_file():
        return None
    shard = torch.load(p, weights_only=False, mmap=True)
    if shard.get("fingerprint") != _fingerprint_hash(fp) or shard["keys"] != [r.key for r in records]:
        return None
    return shard["bad"]


def _write_shard(cache: Path, k: int, records: list[Record], fp: dict, entries: list[dict], bad: list[dict]) -> None:
    tmp = cache / f".shard-{k:05d}.pt.tmp{os.getpid()}"
    torch.save({"fingerprint": _fingerprint_hash(fp), "keys": [r.key for r in records], "entries": entries,
                "bad": bad}, tmp)
    os.replace(tmp, _shard_path(cache, k))  # readers see a whole shard or none


def _claim_cache(cache: Path, fp: dict) -> None:
    """Refuse a cache made with other settings; mark a new one as ours before any shard is written, so even an
    interrupted run cannot leave shards a later run with other settings would mix in."""
    for path in (cache / "fingerprint.json", cache / "index.json"):
        if path.is_file():
            old = json.loads(path.read_text())
            old = old["fingerprint"] if path.name == "index.json" else old
            if old != fp:
                raise CacheMismatchError(cache, _differences(old, fp))
    dist.barrier()  # every rank has compared before rank 0 creates the file
    path = cache / "fingerprint.json"
    if dist.is_main() and not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".fingerprint.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(fp, indent=1))
        os.replace(tmp, path)
    dist.barrier()


def _differences(old: dict, new: dict) -> list[str]:
    old, new = flatten(old), flatten(new)
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a != b:
            shown = f" ({a!r} then, {b!r} now)" if not isinstance(a, list) and len(repr(a)) < 80 else ""
            out.append(f"{key}{shown}")
    return out


def _write_index(cache: Path, fp: dict, manifest: str, num_shards: int) -> dict:
    bad, count, no_audio = [], 0, []
    for k in range(num_shards):
        shard = torch.load(_shard_path(cache, k), weights_only=False, mmap=True)
        bad += shard["bad"]
        count += len(shard["entries"])
        no_audio += [e["source"] for e in shard["entries"] if not e["trains_audio"]]
    for old in cache.glob("shard-*.pt"):  # the manifest shrank: shards past its end are not part of it
        if int(old.stem.split("-")[1]) >= num_shards:
            old.unlink()
    index = {"fingerprint": fp, "manifest": str(Path(manifest).resolve()), "num_shards": num_shards,
             "num_samples": count, "bad": bad, "no_trainable_audio": no_audio}
    tmp = cache / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, cache / "index.json")
    return index


def _gather_by_shard(per_shard: dict[int, list]) -> list:
    """Every rank's {shard: items}, concatenated in shard order (= manifest order) on every rank."""
    import torch.distributed as tdist

    parts = [per_shard]
    if tdist.is_initialized():
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, per_shard)
    merged = {k: v for part in parts for k, v in part.items()}
    return [x for k in sorted(merged) for x in merged[k]]
