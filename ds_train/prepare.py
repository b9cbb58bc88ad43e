"""`ds-train prepare`: check every sample, encode each audio once, write a sharded cache training reads.

cache_dir/
  index.json          fingerprint (what produced the codes), shard list, sample count, bad-sample report
  shard-00000.pt ...  records [k*S, (k+1)*S) of the manifest: token ids, labels, audio codes, provenance

Shard k always holds the same records whatever the number of ranks, so a cache made by 8 processes equals one made
by 1. A re-run skips shards whose record hashes match; a changed fingerprint is an error, never a silent mix.
"""

from __future__ import annotations

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
from ds_train.config import Config
from ds_train.manifest import Record, audio_contents, read_manifest, text_of

CACHE_VERSION = 1
SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below this carries no speech
MIN_SOURCE_RATE = 8000  # below this, resampling up cannot recover what the tokenizer expects


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


@dataclass
class PrepareResult:
    cache_dir: Path
    num_samples: int
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
    _check_fingerprint(cache, fp)
    records = read_manifest(manifest, cfg.data.format, cfg.data.system_prompt)
    if not records:
        raise DataError([{"source": os.path.basename(manifest), "reason": "manifest has no records"}], manifest)
    size = cfg.data.shard_size
    shards = [records[i:i + size] for i in range(0, len(records), size)]
    mine = [k for k in range(len(shards)) if k % dist.world_size() == dist.rank()]

    # Pass 1, cheap and up front: schema, files, headers, text, tokenization. Hours of encoding never start on
    # a manifest that would fail.
    checked = {k: [_check(r, cfg, text_tokenizer) for r in shards[k]] for k in mine}
    bad = _gather([b for k in mine for _, b in checked[k] if b])
    if bad and not cfg.data.skip_bad:
        raise DataError(bad, manifest)

    # Pass 2: decode once, check silence, encode, write shards that are missing or stale.
    todo = [k for k in mine if not _shard_current(cache, k, shards[k])]
    encoded_bad = []
    if todo:
        tok = audio_tokenizer or load_audio_tokenizer(
            cfg.model.audio_tokenizer_path, device=str(dist.device()), semantic_model_path=cfg.model.semantic_model_path)
        cache.mkdir(parents=True, exist_ok=True)
        for k in todo:
            entries, shard_bad = [], []
            for rec, (tokens, problem) in zip(shards[k], checked[k]):
                if problem:
                    shard_bad.append(problem)
                    continue
                try:
                    entries.append(_encode_record(rec, tokens, tok, cfg))
                except AudioError as e:
                    shard_bad.append({"source": rec.source, "reason": str(e)})
            _write_shard(cache, k, shards[k], entries, shard_bad)
            encoded_bad += shard_bad
    encoded_bad = _gather(encoded_bad)
    if encoded_bad and not cfg.data.skip_bad:
        raise DataError(encoded_bad, manifest)

    dist.barrier()
    result = PrepareResult(cache, 0, encoded_shards=len(_gather([k for k in todo])), seconds=time.time() - t0)
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
        "bad": [b for r in results for b in r.bad],
        "no_trainable_audio": [s for r in results for s in r.no_trainable_audio],
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "data_report.json").write_text(json.dumps(report, indent=1))
    if report["skipped"]:
        print(f"data: skipped {report['skipped']} bad sample(s) (data.skip_bad=true); see {out_dir}/data_report.json",
              flush=True)
    return report


def _check(rec: Record, cfg: Config, text_tokenizer):
    """(tokens, None) for a usable record, (None, {"source", "reason"}) for a bad one."""
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    def bad(reason):
        return None, {"source": rec.source, "reason": reason}

    if rec.error:
        return bad(rec.error)
    for text in text_of(rec.sample):
        if not text.strip():
            return bad("empty text")
    clips = audio_contents(rec.sample)
    if not clips:
        return bad("no audio in sample")
    for clip in clips:
        if not os.path.isfile(clip.audio_url):
            return bad(f"audio file not found: {clip.audio_url}")
        try:
            sr, seconds = audio_info(clip.audio_url)
        except AudioError as e:
            return bad(f"{e}: {clip.audio_url}")
        if seconds <= 0:
            return bad(f"audio has zero length: {clip.audio_url}")
        if seconds < cfg.data.min_audio_seconds:
            return bad(f"audio shorter than data.min_audio_seconds={cfg.data.min_audio_seconds}: {clip.audio_url}")
        if seconds > cfg.data.max_audio_seconds:
            return bad(f"audio is {seconds:.1f}s, longer than data.max_audio_seconds={cfg.data.max_audio_seconds}: "
                       f"{clip.audio_url}")
        if sr < MIN_SOURCE_RATE:
            return bad(f"sample rate {sr} Hz is below {MIN_SOURCE_RATE} Hz the tokenizer can take: {clip.audio_url}")
    # boson's helper prints and returns None on any exception; we turn that into a reported error.
    input_ids, label_ids, _, _ = prepare_chatml_sample(rec.sample, text_tokenizer)
    if input_ids is None:
        return bad("could not be tokenized (see the message printed above)")
    if all(t < 0 for t in label_ids):
        return bad("nothing to train on: every label is masked (check start_index and the assistant turns)")
    audio_out = text_tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>")
    # The collator trains an audio-out segment only when its <|AUDIO_OUT|> token carries a label.
    trains_audio = any(i == audio_out and l >= 0 for i, l in zip(input_ids, label_ids))
    return (input_ids, label_ids, trains_audio), None


def _encode_record(rec: Record, tokens, tok, cfg: Config) -> dict:
    input_ids, label_ids, trains_audio = tokens
    codes, paths = [], []
    for clip in audio_contents(rec.sample):
        wav = load_audio(clip.audio_url, tok.sampling_rate)
        if float(np.abs(wav).max()) < SILENCE_PEAK:
            raise AudioError(f"audio is silent: {clip.audio_url}")
        codes.append(encode(tok, wav, cfg.data.loudness_normalize))
        paths.append(clip.audio_url)
    starts = np.cumsum([0] + [c.shape[1] for c in codes[:-1]])
    return {
        "source": rec.source,
        "key": rec.key,
        "input_ids": torch.tensor(input_ids, dtype=torch.int32),
        "label_ids": torch.tensor(label_ids, dtype=torch.int32),
        "audio_codes": torch.cat(codes, dim=1).to(torch.int16),  # codes < 1024 fit; a quarter of int64's bytes
        "audio_starts": torch.tensor(starts, dtype=torch.int64),
        "audio_paths": paths,
        "trains_audio": trains_audio,
    }


def _shard_path(cache: Path, k: int) -> Path:
    return cache / f"shard-{k:05d}.pt"


def _shard_current(cache: Path, k: int, records: list[Record]) -> bool:
    p = _shard_path(cache, k)
    if not p.is_file():
        return False
    return torch.load(p, weights_only=False, mmap=True)["keys"] == [r.key for r in records]


def _write_shard(cache: Path, k: int, records: list[Record], entries: list[dict], bad: list[dict]) -> None:
    tmp = cache / f".shard-{k:05d}.pt.tmp{os.getpid()}"
    torch.save({"keys": [r.key for r in records], "entries": entries, "bad": bad}, tmp)
    os.replace(tmp, _shard_path(cache, k))  # readers see a whole shard or none


def _check_fingerprint(cache: Path, fp: dict) -> None:
    index = cache / "index.json"
    if not index.is_file():
        return
    old = json.loads(index.read_text())["fingerprint"]
    if old != fp:
        changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        raise DataError([{"source": str(index), "reason": f"cache was made with different {', '.join(changed)}"}],
                        f"{cache} (delete it to rebuild, or set data.cache_dir to a new folder)")


def _write_index(cache: Path, fp: dict, manifest: str, num_shards: int) -> dict:
    bad, count, no_audio = [], 0, []
    for k in range(num_shards):
        shard = torch.load(_shard_path(cache, k), weights_only=False, mmap=True)
        bad += shard["bad"]
        count += len(shard["entries"])
        no_audio += [e["source"] for e in shard["entries"] if not e["trains_audio"]]
    index = {"fingerprint": fp, "manifest": str(Path(manifest).resolve()), "num_shards": num_shards,
             "num_samples": count, "bad": bad, "no_trainable_audio": no_audio}
    tmp = cache / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, cache / "index.json")
    return index


def _gather(items: list) -> list:
    """Concatenate a list from every rank, in rank order."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return list(items)
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, items)
    return [x for part in out for x in part]
