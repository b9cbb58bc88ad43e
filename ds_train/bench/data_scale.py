"""`ds-train bench-data CONFIG --scale N`: the launch path at N clips, as every local rank pays it.

A synthetic cache of N clips is written with the cache's own writer (no encoding: random codes, realistic varied
durations and text lengths) next to a manifest whose audio files do not exist, as on a cluster the cache was shipped
to. Then `--ranks` processes start at once and each runs what training runs before its first step: prepare (which
finds the cache current), open the dataset, fit data.max_tokens, plan the epoch, the first 10 micro-batches. The
cache's pages are evicted first (posix_fadvise), so the open is a cold one. Each rank reports its times and its
resident memory, anonymous and file-backed; the data path's share is its growth from before prepare.

Per N, OUTPUT_DIR/bench_data_scale.json gets `clips`, `launch_s` (prepare check + open + plan + first micro-batch,
the slowest rank), `anon_rss_gib` (the data path's anonymous memory, the largest rank), the per-rank detail and the
disk per clip. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ds_train.config import Config
from ds_train.fsutil import dir_size

FRAME_RATE = 25  # codes per second of the Higgs audio tokenizer
FIRST_BATCHES = 10
SPEAKERS = 2000


def bench_data_scale(cfg: Config, scales: list[int], ranks: int = 2, keep: bool = False) -> dict:
    """Build a synthetic cache per N in `scales`, measure the launch path on `ranks` processes, write
    OUTPUT_DIR/bench_data_scale.json (merged with the scales measured before) and return it."""
    from ds_train.preflight import preflight

    pre = preflight(cfg, for_prepare=True)
    out = Path(pre.out_dir)
    path = out / "bench_data_scale.json"
    result = json.loads(path.read_text()) if path.is_file() else {"scales": {}}
    for n in scales:
        work = out / "bench_data_scale" / str(n)
        t0 = time.perf_counter()
        manifest, cache = build_synthetic_cache(cfg, pre.model_config, pre.text_tokenizer, work, n)
        build_s = time.perf_counter() - t0
        run_cfg = replace(cfg, data=replace(cfg.data, train_file=str(manifest), train_files=None, eval_file=None,
                                            eval_split=None, cache_dir=str(cache)))
        _evict(cache)
        _evict(manifest.parent)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(run_cfg, r, ranks, queue)) for r in range(ranks)]
        for p in procs:
            p.start()
        per_rank = sorted((queue.get(timeout=3600) for _ in procs), key=lambda x: x["rank"])
        for p in procs:
            p.join()
        failed = [f"rank {x['rank']}: {x['error']}" for x in per_rank if "error" in x]
        if failed:
            raise RuntimeError(f"bench-data --scale {n}: " + "; ".join(failed))
        row = {"clips": n, "ranks": ranks,
               "launch_s": max(r["launch_s"] for r in per_rank),
               "anon_rss_gib": max(r["data_anon_gib"] for r in per_rank),
               "file_rss_gib": max(r["data_file_gib"] for r in per_rank),
               "disk_bytes_per_clip": dir_size(cache) / n, "manifest_bytes_per_clip": manifest.stat().st_size / n,
               "audio_files_opened": sum(r["audio_files_opened"] for r in per_rank),
               "build_s": build_s, "per_rank": per_rank}
        result["scales"][str(n)] = row
        _print(row)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def build_synthetic_cache(cfg: Config, model_config, text_tokenizer, work: Path, n: int) -> tuple[Path, Path]:
    """A TTS manifest of n rows (the audio files absent) and its cache, written by cache.py's own writer with random
    codes: durations log-normal around 6 s (1-20 s, as LibriTTS-R and Emilia clips), text ~15 characters a second."""
    from ds_train.data.cache import DIGESTS, fingerprint, manifest_digest, write_digests, write_index, write_shard
    from ds_train.data.manifest import Record

    cache, manifest = work / "cache", work / "train.jsonl"
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    rng = np.random.default_rng(n)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.6, n), 1.0, 20.0)
    text_tokens = np.maximum(4, (seconds * 15 / 4 * rng.uniform(0.7, 1.3, n)).astype(int))
    prompt = 40  # system prompt, turn markers, audio bos/eos
    with open(manifest, "w") as f:
        for i in range(n):
            f.write(json.dumps({"audio": f"wavs/{i:08d}.wav", "text": "w" * int(4 * text_tokens[i]),
                                "speaker": f"spk{i % SPEAKERS}"}) + "\n")
    fp = fingerprint(cfg, text_tokenizer, cfg.model.audio_tokenizer_path)
    (cache / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    audio_out = model_config.audio_out_token_idx
    special = [model_config.audio_in_token_idx, audio_out]
    k, size = model_config.audio_num_codebooks, cfg.data.shard_size
    name = manifest.name
    for s in range(0, n, size):
        records, entries = [], []
        for i in range(s, min(n, s + size)):
            frames = int(seconds[i] * FRAME_RATE)
            ids = rng.integers(100, 1000, prompt + int(text_tokens[i]), dtype=np.int32)
            ids[np.isin(ids, special)] = 100
            ids[-2] = audio_out
            labels = np.full_like(ids, -100)
            labels[-2:] = ids[-2:]
            source = f"{name}:{i + 1}"
            records.append(Record(source, None, f"synthetic-{i}"))
            entries.append({"source": source, "key": f"synthetic-{i}", "input_ids": torch.from_numpy(ids),
                            "label_ids": torch.from_numpy(labels),
                            "audio_codes": torch.from_numpy(rng.integers(0, 1024, (k, frames), dtype=np.int16)),
                            "audio_starts": torch.zeros(1, dtype=torch.int64),
                            "audio_paths": [str(work / "wavs" / f"{i:08d}.wav")],
                            "clip_seconds": [float(seconds[i])], "clip_is_out": [True], "trains_audio": True,
                            "order": i + 1})
        write_shard(cache, s // size, records, fp, entries, [])
    # The digests a real prepare remembers: the relaunch stats each clip (here all absent: a shipped cache).
    write_digests(cache / DIGESTS, {str(work / "wavs" / f"{i:08d}.wav"): (480_000, 1_700_000_000_000_000_000, "0" * 40)
                                    for i in range(n)})
    limits = (cfg.data.min_audio_seconds, cfg.data.max_audio_seconds)
    write_index(cache, fp, str(manifest), -(-n // size), limits, manifest_digest(str(manifest)), [],
                cfg.data.plausibility)
    return manifest, cache


def _evict(path: Path) -> None:
    """Drop the files' pages from the page cache (no root needed for clean pages): the next open is cold."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _memory() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status[key].split()[0])  # noqa: E731
    return {"anon": kib("RssAnon") / 2**20, "file": (kib("RssFile") + kib("RssShmem")) / 2**20}


def _rank(cfg: Config, rank: int, world: int, queue) -> None:
    """One rank's launch path, timed; puts its numbers (or its error) on `queue`."""
    try:
        _launch_path(cfg, rank, world, queue)
    except BaseException as e:
        queue.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})
        raise


def _launch_path(cfg: Config, rank: int, world: int, queue) -> None:
    import builtins

    import soundfile

    from ds_train.data.cache import CachedDataset
    from ds_train.data.collate import make_collator
    from ds_train.data.loader import build_loader, fit_max_tokens, train_sampler
    from ds_train.data.prepare import prepare
    from ds_train.preflight import load_model_config, load_text_tokenizer

    model_config = load_model_config(cfg.model.path)
    text_tokenizer = load_text_tokenizer(cfg, model_config)
    collator = make_collator(model_config, cfg.model.whisper_processor_path)
    torch.set_num_threads(1)
    opened = []  # audio files opened: a relaunch must open none
    real_open, real_sf = builtins.open, soundfile.SoundFile.__init__

    def counting_open(file, *a, **kw):
        if str(file).endswith(".wav"):
            opened.append(str(file))
        return real_open(file, *a, **kw)

    def counting_sf(self, file, *a, **kw):
        opened.append(str(file))
        return real_sf(self, file, *a, **kw)

    builtins.open, soundfile.SoundFile.__init__ = counting_open, counting_sf
    before = _memory()
    t0 = time.perf_counter()
    prepared = prepare(cfg, cfg.data.train_file, text_tokenizer, cfg.data.cache_dir)
    t1 = time.perf_counter()
    dataset = CachedDataset(prepared.cache_dir, model_config)
    fit_max_tokens(dataset, cfg, cfg.data.train_file)
    t2 = time.perf_counter()
    sampler = train_sampler(dataset, cfg, rank, world)
    sampler.set_epoch(0)
    sampler.plan_arrays()
    t3 = time.perf_counter()
    loader, _ = build_loader(dataset, collator, cfg, rank, world, sampler=sampler)
    batches = iter(loader)
    first = next(batches)
    t4 = time.perf_counter()
    tokens = first.num_tokens
    for _ in range(FIRST_BATCHES - 1):
        tokens += next(batches).num_tokens
    t5 = time.perf_counter()
    after = _memory()
    builtins.open, soundfile.SoundFile.__init__ = real_open, real_sf
    queue.put({"rank": rank, "prepare_check_s": t1 - t0, "open_s": t2 - t1, "plan_s": t3 - t2,
               "first_batch_s": t4 - t3, "launch_s": t4 - t0, "ten_batches_s": t5 - t3, "tokens_10_batches": tokens,
               "steps_per_epoch": sampler.steps_per_epoch(), "samples": len(dataset),
               "data_anon_gib": after["anon"] - before["anon"], "data_file_gib": after["file"] - before["file"],
               "anon_rss_total_gib": after["anon"], "file_rss_total_gib": after["file"],
               "audio_files_opened": len(opened)})


def _print(r: dict) -> None:
    print(f"bench-data --scale {r['clips']:,}: {r['ranks']} ranks; launch to first micro-batch {r['launch_s']:.2f}s "
          f"(slowest rank); data-path RSS per rank anon {r['anon_rss_gib']:.3f} GiB, file-backed "
          f"{r['file_rss_gib']:.3f} GiB; {r['disk_bytes_per_clip'] / 1024:.1f} KiB/clip on disk; "
          f"{r['audio_files_opened']} audio files opened (cache built in {r['build_s']:.0f}s)")
    for x in r["per_rank"]:
        print(f"  rank {x['rank']}: prepare check {x['prepare_check_s']:.2f}s, open {x['open_s']:.2f}s, plan "
              f"{x['plan_s']:.2f}s, first micro-batch {x['first_batch_s']:.2f}s, 10 batches {x['ten_batches_s']:.2f}s; "
              f"process RSS anon {x['anon_rss_total_gib']:.2f} GiB, file {x['file_rss_total_gib']:.2f} GiB")
