"""The prepared cache: the one owner of its format, writer and reader.

cache_dir/
  fingerprint.json    what produces the codes (tokenizers, settings); written before any shard
  digests.dsc         (real path, size, mtime_ns, sha1) of each clip the manifest names: audio is read once (a clip
                      inside a data set's tar/parquet/Arrow file: `FILE::MEMBER`, with that file's size and mtime)
  shard-00000.dsc ... records [k*S, (k+1)*S) of the manifest in columns (columns.py): token ids, labels, codes,
                      clip starts, durations, per-record offsets and lengths; keys, bad records, paths in its header
  samples.npy         the index: one int64 row per usable sample (shard, entry, offsets, lengths, manifest line or,
                      for a data set of several files, record number)
  index.json          fingerprint, manifest digest, counts, bad-sample report, the data set's files (`parts`: name
                      and first record number, to name a sample FILE:ROW); written last
  shard-00000.lock    only while a `prepare` run encodes shard 0 (see prepare.py)
  piece-00000-00013-00026.dsc  only while shard 0 is encoded: the records of it one rank encoded (here 13-25)

Shard k always holds the same records whatever the number of ranks, so a cache made by 8 processes equals one made
by 1. A shard is current when its record keys and fingerprint match; a cache made with other settings is an error,
never a silent mix. Opening a cache (CachedDataset) reads index.json and maps samples.npy: no sample is read, and the
dataset holds numpy arrays, not per-sample Python objects; DataLoader workers share the mapped pages. No file of
the cache is a pickle: a cache handed over from elsewhere cannot run code when opened.
"""

from __future__ import annotations

import array
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ds_train import dist
from ds_train.config import Config, flatten
from ds_train.data import clips
from ds_train.data.audio import tokenizer_fingerprint
from ds_train.data.collate import to_dataset_sample
from ds_train.data.columns import read_arrays, write_arrays
from ds_train.data.manifest import Record
from ds_train.data.validate import duration_problem
from ds_train.errors import CacheMismatchError
from ds_train.fsutil import atomic_write

CACHE_VERSION = 6  # 3: tokenizer and records fingerprinted by content; 4: clips resampled as the serve engine
# loads references (librosa soxr_hq), not torchaudio; 5: clip durations kept, duration limits applied at load;
# 6: columns, memory-mapped (no pickle), an index of every sample, audio digests remembered
OLD_SHARDS = "shard-*.pt"  # versions <= 5: pickled (torch.save) shards
SHARD = "shard-{:05d}.dsc"
# Per-entry columns of a shard's `rows` array; the index (samples.npy) is [shard, entry] + these.
ROW = ("tok_off", "n_tok", "code_off", "n_frames", "start_off", "n_clips", "line", "trains_audio", "n_out_clips",
       "out_frames")
COL = {name: i for i, name in enumerate(("shard", "entry") + ROW)}


def default_cache_dir(manifest: str) -> Path:
    p = Path(manifest).resolve()
    return p.parent / ".ds_train_cache" / p.stem


def cache_dirs(cfg: Config) -> tuple[list[Path], Optional[Path]]:
    """(a cache per training manifest, the eval cache or None). Without data.cache_dir each cache sits next to its
    manifest. With it: one manifest (data.train_file) uses CACHE_DIR, its eval manifest CACHE_DIR-eval; a list
    (data.train_files) gives every manifest, the eval one too, CACHE_DIR/<stem>-<hash of its absolute path>, so two
    manifests that share a name never share a cache."""
    d = cfg.data
    train = [m for m, _ in d.manifests()]
    if not d.cache_dir:
        return [default_cache_dir(m) for m in train], (default_cache_dir(d.eval_file) if d.eval_file else None)
    root = Path(d.cache_dir)
    if d.train_files is None:
        return [root], (root.with_name(root.name + "-eval") if d.eval_file else None)
    return [_sub_cache(root, m) for m in train], (_sub_cache(root, d.eval_file) if d.eval_file else None)


def _sub_cache(root: Path, manifest: str) -> Path:
    p = Path(manifest).resolve()
    return root / f"{p.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def fingerprint(cfg: Config, text_tokenizer, audio_tokenizer_path: str) -> dict:
    vocab = json.dumps(sorted(text_tokenizer.get_vocab().items()))
    d = cfg.data
    return {
        "version": CACHE_VERSION,
        "audio_tokenizer": tokenizer_fingerprint(audio_tokenizer_path),
        "text_tokenizer": hashlib.sha1(vocab.encode()).hexdigest(),
        # Not the duration limits: they change which samples are used, never their codes (see rejudge).
        "settings": {"format": d.format, "system_prompt": d.system_prompt, "loudness_normalize": d.loudness_normalize,
                     "shard_size": d.shard_size,
                     # padded batches change codes; named only when used, so one-by-one caches keep their fingerprint
                     **({"encode_batch": d.encode_batch} if d.encode_batch != 1 else {})},
    }


def _fingerprint_hash(fp: dict) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _shard_path(cache: Path, k: int) -> Path:
    return cache / SHARD.format(k)


def manifest_digest(manifest: str) -> str:
    """SHA-1 of the manifest's bytes: with the fingerprint, what makes a cache current without reading audio."""
    h = hashlib.sha1()
    with open(manifest, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def current_index(cache: Path, fp: dict, manifest_sha1: str, limits, plausibility: str) -> Optional[dict]:
    """index.json when the cache is complete for this manifest's bytes, fingerprint, duration limits and
    plausibility mode, and no audio file changed (a relaunch: nothing to check, no audio to open); None otherwise."""
    try:
        index = json.loads((cache / "index.json").read_text())
    except (OSError, ValueError):
        return None
    same = (index.get("fingerprint") == fp and index.get("manifest_sha1") == manifest_sha1
            and index.get("audio_seconds") == list(limits) and index.get("plausibility") == plausibility)
    return index if same and (cache / "samples.npy").is_file() and audio_unchanged(cache) else None


class DigestMemo:
    """SHA-1 of audio files remembered in the cache (digests.dsc), keyed by (real path, size, mtime; for a member of a
    data set's tar / parquet / Arrow file its file's size and mtime): a relaunch stats files instead of reading them; a data set moved elsewhere is hashed once more (new paths), never encoded
    again (the record keys are by content). A file missing when the manifest was read is remembered as missing; a
    clip's duration (its header), once read, is remembered with its digest."""

    def __init__(self, cache: Path):
        self.path = cache / DIGESTS
        self.known: dict[str, tuple] = {}
        if self.path.is_file():
            for real, size, mtime, sha1, seconds in _digest_rows(self.path):
                self.known[real] = (size, mtime, sha1, seconds)
        self.used: dict[str, tuple] = {}
        self._by_sha1: Optional[dict[str, float]] = None

    def __call__(self, path: str) -> Optional[str]:
        """The clip's SHA-1; None when there is no such file (or member of a data set's file, clips.py)."""
        real = clips.real(path)
        try:
            st = os.stat(clips.holder(real))
        except OSError:
            self.used[real] = (-1, -1, "", -1.0)
            return None
        seen = self.known.get(real)
        if not (seen and seen[0] == st.st_size and seen[1] == st.st_mtime_ns and seen[2]):
            if not clips.exists(real):  # a member its file does not hold: missing while that file stays as it is
                self.used[real] = (st.st_size, st.st_mtime_ns, "", -1.0)
                return None
            sha1 = clips.digest(real)
            # A known clip under a new path (the data set moved): its duration is known too.
            seen = (st.st_size, st.st_mtime_ns, sha1, self._seconds_by_sha1().get(sha1, -1.0))
        self.used[real] = seen
        return seen[2]

    def _seconds_by_sha1(self) -> dict[str, float]:
        if self._by_sha1 is None:
            self._by_sha1 = {v[2]: v[3] for v in self.known.values() if v[2] and v[3] >= 0}
        return self._by_sha1

    def seconds(self, path: str) -> float:
        """The clip's duration: remembered for a file digested unchanged, else read from its header."""
        from ds_train.data.audio import audio_info

        real = clips.real(path)
        seen = self.used.get(real) or self.known.get(real)
        st = os.stat(clips.holder(real))
        if seen and seen[0] == st.st_size and seen[1] == st.st_mtime_ns and seen[3] >= 0:
            return seen[3]
        seconds = float(audio_info(path)[1])
        if seen and seen[0] == st.st_size and seen[1] == st.st_mtime_ns:
            self.used[real] = (*seen[:3], seconds)
        return seconds

    def save(self) -> None:
        """Keep the digests of this manifest's files (rank 0; every rank computed the same)."""
        if dist.is_main() and self.used != self.known and self.path.parent.is_dir():
            write_digests(self.path, self.used)


DIGESTS = "digests.dsc"


def write_digests(path: Path, digests: dict[str, tuple]) -> None:
    """{real path: (size, mtime_ns, sha1, seconds; -1, -1, "", -1 for a missing file; seconds -1: not read)} as
    columns (no dict to parse at start)."""
    names = [p.encode() for p in digests]
    values = list(digests.values())
    write_arrays(path, {"paths": np.frombuffer(b"".join(names), np.uint8),
                        "ends": np.cumsum([len(n) for n in names], dtype=np.int64),
                        "size": np.array([v[0] for v in values], np.int64),
                        "mtime": np.array([v[1] for v in values], np.int64),
                        "sha1": np.array([v[2].encode() for v in values], "S40"),
                        "seconds": np.array([v[3] for v in values], np.float64)}, {})


def _digest_rows(path: Path):
    """(real path, size, mtime_ns, sha1 or "", seconds or -1) of each remembered file."""
    _, a = read_arrays(path)
    blob, ends, starts = a["paths"], a["ends"], np.concatenate([[0], a["ends"][:-1]]).astype(np.int64)
    for i in range(len(ends)):
        yield (bytes(blob[starts[i]:ends[i]]).decode(), int(a["size"][i]), int(a["mtime"][i]),
               a["sha1"][i].decode(), float(a["seconds"][i]))


def audio_unchanged(cache: Path) -> bool:
    """No audio file the cache was made from has changed since (a stat each, no file opened; a file that holds many
    clips, a tar or parquet shard, is stat'ed once): same size and mtime, or absent now (the cache was shipped without
    its audio); and none that was missing has appeared."""
    path = cache / DIGESTS
    if not path.is_file():
        return True
    stats: dict[str, Optional[os.stat_result]] = {}
    for real, size, mtime, _, _ in _digest_rows(path):
        file = clips.holder(real)
        if file not in stats:
            try:
                stats[file] = os.stat(file)
            except OSError:
                stats[file] = None
        st = stats[file]
        if st is None:
            continue  # absent here: training reads the cache, not the audio
        if size < 0 or st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


def _read_shard(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    return read_arrays(path)


def _entries_of(meta: dict, a: dict[str, np.ndarray]) -> list[dict]:
    """The entries (prepare.encode_record's dicts) of a shard or piece, tensors copied out of the mapping."""
    out = []
    for j, info in enumerate(meta["entries"]):
        t0, nt, c0, nc, s0, ns = (int(x) for x in a["rows"][j][:6])
        out.append({**info,
                    "input_ids": torch.from_numpy(np.array(a["input_ids"][t0:t0 + nt])),
                    "label_ids": torch.from_numpy(np.array(a["label_ids"][t0:t0 + nt])),
                    "audio_codes": torch.from_numpy(_codes(a, meta["codebooks"], c0, nc)),
                    "audio_starts": torch.from_numpy(np.array(a["starts"][s0:s0 + ns])),
                    "clip_seconds": a["seconds"][s0:s0 + ns].tolist(),
                    "clip_is_out": a["clip_is_out"][s0:s0 + ns].astype(bool).tolist(),
                    "trains_audio": bool(a["rows"][j][ROW.index("trains_audio")]),
                    "order": int(a["rows"][j][ROW.index("line")])})
    return out


def _codes(a: dict[str, np.ndarray], k: int, start: int, frames: int) -> np.ndarray:
    """An entry's codes (k, frames), copied out of the mapping; `start` counts frames."""
    return np.array(a["codes"][start * k:(start + frames) * k]).reshape(k, frames)


def _write_entries(path: Path, entries: list[dict], meta: dict) -> None:
    """Entries as columns: concatenated token ids, labels, codes (K, frames) and clip starts, with per-entry
    offsets and lengths in `rows`; the strings (source, key, audio paths) go in the header."""
    rows, tok, codes, clips = [], 0, 0, 0
    for e in entries:
        n_frames = int(e["audio_codes"].shape[1])
        starts = e["audio_starts"].tolist() + [n_frames]
        out = [starts[j + 1] - starts[j] for j, o in enumerate(e["clip_is_out"]) if o]
        rows.append([tok, len(e["input_ids"]), codes, n_frames, clips, len(e["audio_paths"]),
                     int(e["order"]), int(e["trains_audio"]), len(out), sum(out)])
        tok, codes, clips = tok + len(e["input_ids"]), codes + n_frames, clips + len(e["audio_paths"])
    k = int(entries[0]["audio_codes"].shape[0]) if entries else 0

    def cat(key, dtype):
        return np.concatenate([np.asarray(e[key], dtype) for e in entries]) if entries else np.zeros(0, dtype)

    arrays = {
        "rows": np.array(rows, np.int64).reshape(len(entries), len(ROW)),
        "input_ids": cat("input_ids", np.int32), "label_ids": cat("label_ids", np.int32),
        # Each entry's (K, frames) block whole and in a row: reading one sample touches one stretch of the file.
        "codes": (np.concatenate([e["audio_codes"].numpy().astype(np.int16).ravel() for e in entries]) if entries
                  else np.zeros(0, np.int16)),
        "starts": cat("audio_starts", np.int64), "seconds": cat("clip_seconds", np.float64),
        "clip_is_out": cat("clip_is_out", np.int8),
    }
    meta = {**meta, "codebooks": k,
            "entries": [{"source": e["source"], "key": e["key"], "audio_paths": list(e["audio_paths"])}
                        for e in entries]}
    write_arrays(path, arrays, meta)


def stored_bad(cache: Path, k: int, records: list[Record], fp: dict, limits) -> Optional[list[dict]]:
    """The bad-sample list of shard k under the duration `limits` (min, max seconds) when the shard is current
    (same records, same fingerprint, no clip left out for a limit it now meets); None when it must be encoded."""
    p = _shard_path(cache, k)
    if not p.is_file():
        return None
    meta, a = _read_shard(p)
    if meta.get("fingerprint") != _fingerprint_hash(fp) or meta["keys"] != [r.key for r in records]:
        return None
    if any("seconds" in b and duration_problem(b["seconds"], *limits) is None for b in meta["bad"]):
        return None  # a clip that was too long or short fits now: encode the shard again to include it
    return rejudge(meta, a, limits)[0]


def rejudge(meta: dict, a: dict[str, np.ndarray], limits) -> tuple[list[dict], np.ndarray]:
    """A shard's bad samples under `limits`, in manifest order (the stored ones plus encoded samples with a clip
    outside the limits now), and a mask of its entries within the limits."""
    bad = list(meta["bad"])
    rows, seconds = a["rows"], a["seconds"]
    low, high = limits
    outside = (seconds < low) | (seconds > high)
    used = np.ones(len(rows), bool)
    for j in np.flatnonzero(np.add.reduceat(outside, rows[:, 4]) if len(rows) and len(seconds) else []):
        s0, n = int(rows[j, 4]), int(rows[j, 5])
        first = s0 + int(np.flatnonzero(outside[s0:s0 + n])[0]) if n and outside[s0:s0 + n].any() else None
        if first is None:
            continue
        used[j] = False
        path, s = meta["entries"][j]["audio_paths"][first - s0], float(seconds[first])
        bad.append({"source": meta["entries"][j]["source"], "reason": f"{duration_problem(s, *limits)}: {path}",
                    "clip": path, "seconds": s})
    return sorted(bad, key=lambda b: source_order(b["source"])), used


def source_order(source: str) -> tuple[str, int]:
    """Sorts a data set's sources ("train.jsonl:12", "shard-00003.tar:17") in record order: the readers read a data
    set's files in the order of their names."""
    name, _, n = source.rpartition(":")
    return name, int(n)


def write_shard(cache: Path, k: int, records: list[Record], fp: dict, entries: list[dict], bad: list[dict]) -> None:
    _write_entries(_shard_path(cache, k), entries,
                   {"fingerprint": _fingerprint_hash(fp), "keys": [r.key for r in records], "bad": bad})


def lock_path(cache: Path, k: int) -> Path:
    return cache / f"shard-{k:05d}.lock"


def write_piece(cache: Path, k: int, fp: dict, done: list[tuple]) -> None:
    """Records of shard k that one rank encoded: `done` holds (index in the shard, record key, cache entry or None,
    bad-sample dict or None), in index order."""
    path = cache / f"piece-{k:05d}-{done[0][0]:05d}-{done[-1][0] + 1:05d}.dsc"
    # A crash leaves whole pieces or none (written atomically): a re-run reuses them.
    _write_entries(path, [e for _, _, e, _ in done if e is not None],
                   {"fingerprint": _fingerprint_hash(fp), "done": [[i, key, e is not None, b] for i, key, e, b in done]})


def read_pieces(cache: Path, k: int, records: list[Record], fp: dict) -> dict[int, tuple]:
    """{index: (entry or None, bad or None)} of the records of shard k some piece holds for their current key."""
    out = {}
    for path in sorted(cache.glob(f"piece-{k:05d}-*.dsc")):
        meta, a = _read_shard(path)
        if meta["fingerprint"] != _fingerprint_hash(fp):
            continue
        entries = iter(_entries_of(meta, a))
        for i, key, has_entry, bad in meta["done"]:
            entry = next(entries) if has_entry else None
            if i < len(records) and records[i].key == key:
                out[i] = (entry, bad)
    return out


def assemble_shard(cache: Path, k: int, records: list[Record], fp: dict, found: dict[int, dict]) -> list[dict]:
    """Write shard k from its pieces and remove them: entries in record order, `found` ({index: bad}, the records
    the check pass rejected) and those that failed to encode as its bad samples. Returns the latter."""
    done = read_pieces(cache, k, records, fp)
    missing = [r.source for i, r in enumerate(records) if i not in found and i not in done]
    if missing:
        raise RuntimeError(f"{cache}: no piece file holds {', '.join(missing[:5])} of shard {k} "
                           f"({len(missing)} record(s)); were piece files removed during the run?")
    entries, bad, failed = [], [], []
    for i in range(len(records)):
        if i in found:
            bad.append(found[i])
            continue
        entry, problem = done[i]
        if entry is None:
            bad.append(problem)
            failed.append(problem)
        else:
            entries.append(entry)
    write_shard(cache, k, records, fp, entries, bad)
    remove_pieces(cache, k)
    return failed


def remove_pieces(cache: Path, k: Optional[int] = None) -> None:
    """Piece files of shard k (of every shard when k is None)."""
    for path in cache.glob("piece-*.dsc" if k is None else f"piece-{k:05d}-*.dsc"):
        path.unlink(missing_ok=True)


def claim_cache(cache: Path, fp: dict) -> None:
    """Refuse a cache made with other settings; mark a new one as ours before any shard is written, so even an
    interrupted run cannot leave shards a later run with other settings would mix in. A cache of the pickled
    format (version <= 5) made with the same settings is re-encoded in this format, said in one line."""
    for path in (cache / "fingerprint.json", cache / "index.json"):
        if path.is_file():
            old = json.loads(path.read_text())
            old = old["fingerprint"] if path.name == "index.json" else old
            if old != fp and _old_format(old, fp):
                dist.print0(f"prepare: {cache} is in the pickled format of cache version {old.get('version')}; "
                            f"encoding it again in the memory-mapped format of version {CACHE_VERSION}")
                break
            if old != fp:
                raise CacheMismatchError(cache, _differences(old, fp))
    dist.barrier()  # every rank has compared before rank 0 creates the file
    path = cache / "fingerprint.json"
    if dist.is_main():
        cache.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or json.loads(path.read_text()) != fp:
            for old in cache.glob(OLD_SHARDS):
                old.unlink()
            (cache / "index.json").unlink(missing_ok=True)
            atomic_write(path, json.dumps(fp, indent=1))
    dist.barrier()


def _old_format(old: dict, new: dict) -> bool:
    return isinstance(old.get("version"), int) and old["version"] < 6 and {**old, "version": 0} == {**new, "version": 0}


def _differences(old: dict, new: dict) -> list[str]:
    old, new = flatten(old), flatten(new)
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a != b:
            shown = f" ({a!r} then, {b!r} now)" if not isinstance(a, list) and len(repr(a)) < 80 else ""
            out.append(f"{key}{shown}")
    return out


def write_index(cache: Path, fp: dict, manifest: str, num_shards: int, limits, manifest_sha1: str = "",
                warnings: Optional[list] = None, plausibility: str = "", files: Optional[list] = None) -> dict:
    """samples.npy (every usable sample's shard, entry, offsets and lengths) and index.json, from the shards.
    `files`: [file name, first record number] of each file of a data set of several (data/formats/): the `line`
    column holds record numbers then, and a sample's source is FILE:(number - first); default one file, the
    manifest, whose line numbers are the numbers."""
    bad, no_audio, parts, codebooks = [], [], [], 0
    for k in range(num_shards):
        meta, a = _read_shard(_shard_path(cache, k))
        shard_bad, used = rejudge(meta, a, limits)
        bad += shard_bad
        rows = np.asarray(a["rows"])
        keep = np.flatnonzero(used)
        parts.append(np.concatenate([np.full((len(keep), 1), k), keep[:, None], rows[keep]], axis=1))
        no_audio += [meta["entries"][j]["source"] for j in keep if not rows[j, ROW.index("trains_audio")]]
        codebooks = max(codebooks, meta["codebooks"])
    for old in cache.glob("shard-*.dsc"):  # the manifest shrank: shards past its end are not part of it
        if int(old.stem.split("-")[1]) >= num_shards:
            old.unlink()
    remove_pieces(cache)  # every shard is current now: pieces are leftovers of a run stopped after assembling
    samples = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, len(COL)), np.int64)
    tmp = cache / f".samples.npy.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, samples)
    os.replace(tmp, cache / "samples.npy")
    index = {"fingerprint": fp, "manifest": str(Path(manifest).resolve()), "manifest_name": Path(manifest).name,
             "manifest_sha1": manifest_sha1, "num_shards": num_shards,
             "audio_seconds": list(limits),  # the duration limits samples.npy applies
             "plausibility": plausibility, "codebooks": codebooks,
             "parts": files or [[Path(manifest).name, 0]],
             "num_samples": len(samples), "bad": bad, "no_trainable_audio": no_audio, "warnings": warnings or []}
    atomic_write(cache / "index.json", json.dumps(index, indent=1))
    return index


class _Store:
    """One opened cache: its index.json and the mapped samples.npy; shards mapped when a sample of theirs is read.
    Pickles (to spawned DataLoader workers) without the mappings, which are made again there."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.index = json.loads((cache / "index.json").read_text())
        self.name = self.index["manifest_name"]
        parts = self.index.get("parts") or [[self.name, 0]]  # caches written before data sets of several files
        self.part_names, self.part_starts = [p[0] for p in parts], np.array([p[1] for p in parts], np.int64)
        self._samples, self._shards = None, {}

    @property
    def samples(self) -> np.ndarray:
        if self._samples is None:
            self._samples = np.load(self.cache / "samples.npy", mmap_mode="r")
        return self._samples

    def shard(self, k: int) -> tuple[dict, dict[str, np.ndarray]]:
        if k not in self._shards:
            self._shards[k] = _read_shard(_shard_path(self.cache, k))
        return self._shards[k]

    def __getstate__(self):
        return {**self.__dict__, "_samples": None, "_shards": {}}


class CachedDataset(Dataset):
    """Samples of a prepared cache, in manifest order: numpy arrays over memory-mapped columns."""

    def __init__(self, cache_dir: str | Path, model_config, whisper: bool = False):
        cache = Path(cache_dir)
        if not (cache / "index.json").is_file() or not (cache / "samples.npy").is_file():
            if list(cache.glob(OLD_SHARDS)):
                raise FileNotFoundError(f"{cache} is a cache in the old pickled format (ds_train cache version <= 5): "
                                        "run `ds-train prepare CONFIG` once to rebuild it")
            raise FileNotFoundError(f"no prepared cache at {cache}: run `ds-train prepare CONFIG` first")
        store = _Store(cache)
        self.index = store.index
        self.audio_in_id = model_config.audio_in_token_idx
        self.audio_out_id = model_config.audio_out_token_idx
        self.num_codebooks = model_config.audio_num_codebooks
        self.delay = bool(model_config.use_delay_pattern)
        self.whisper = whisper
        have = self.index["codebooks"]
        if store.index["num_samples"] and have < self.num_codebooks:
            raise ValueError(f"{cache}: cached audio has {have} codebooks, the model needs {self.num_codebooks} "
                             "(audio tokenizer does not match the model)")
        self.stores = [store]
        n = store.index["num_samples"]
        self.part = np.zeros(n, np.int16)  # which store, and which row of its samples.npy, sample i is
        self.row = np.arange(n, dtype=np.int64)
        s = store.samples
        self._set_lengths(s[:, COL["n_tok"]] + s[:, COL["out_frames"]]
                          + s[:, COL["n_out_clips"]] * (1 + (self.num_codebooks - 1 if self.delay else 0)))

    def _set_lengths(self, lengths: np.ndarray) -> None:
        # Merged lengths in a compact array.array (8 bytes a sample, no int objects): it reads as a list of Python
        # ints (max(), JSON and YAML see ints) and numpy views it without a copy (length_array).
        self.lengths = array.array("q", np.ascontiguousarray(lengths, np.int64).tobytes())

    def length_array(self) -> np.ndarray:
        """The merged lengths as a numpy view."""
        return np.frombuffer(self.lengths, np.int64)

    def __len__(self) -> int:
        return len(self.row)

    def subset(self, indices) -> "CachedDataset":
        """A dataset of these samples only (a held-out eval set); this one is left as it is."""
        part = copy.copy(self)
        indices = np.asarray(indices, np.int64)
        part.part, part.row = self.part[indices], self.row[indices]
        part._set_lengths(self.length_array()[indices])
        return part

    @staticmethod
    def concat(parts: list["CachedDataset"]) -> "CachedDataset":
        """Several manifests' samples as one dataset, in list order (data.train_files)."""
        whole = copy.copy(parts[0])
        whole.index = None  # no single index.json describes it
        whole.stores, pieces = [], []
        for p in parts:
            pieces.append(p.part + len(whole.stores))
            whole.stores += p.stores
        whole.part = np.concatenate(pieces).astype(np.int16)
        whole.row = np.concatenate([p.row for p in parts])
        whole._set_lengths(np.concatenate([p.length_array() for p in parts]))
        return whole

    def drop(self, indices) -> None:
        """Leave samples out (skipped as bad after preparation, e.g. longer than data.max_tokens)."""
        keep = np.ones(len(self), bool)
        keep[np.asarray(list(indices), np.int64)] = False
        self.part, self.row = self.part[keep], self.row[keep]
        self._set_lengths(self.length_array()[keep])

    def _at(self, i: int) -> tuple[_Store, np.ndarray]:
        store = self.stores[int(self.part[i])]
        return store, store.samples[int(self.row[i])]

    def source(self, i: int) -> str:
        """"manifest.jsonl:LINE" (or "shard-00003.tar:ROW") of sample i, as error reports name it."""
        store, s = self._at(i)
        n = int(s[COL["line"]])
        p = int(np.searchsorted(store.part_starts, n, side="right")) - 1
        return f"{store.part_names[p]}:{n - int(store.part_starts[p])}"

    def record_numbers(self) -> np.ndarray:
        """Each sample's record number in its manifest (a JSONL manifest's line), vectorised: no per-sample object."""
        lines = np.empty(len(self), np.int64)
        for p, store in enumerate(self.stores):
            mine = self.part == p
            lines[mine] = store.samples[self.row[mine], COL["line"]]
        return lines

    def sources(self, indices: Optional[Sequence[int]] = None) -> list[str]:
        return [self.source(int(i)) for i in (range(len(self)) if indices is None else indices)]

    def entry(self, i: int) -> dict:
        """Sample i as prepare.encode_record made it (tensors copied out of the cache)."""
        store, s = self._at(i)
        meta, a = store.shard(int(s[COL["shard"]]))
        return _entries_of({"entries": [meta["entries"][int(s[COL["entry"]])]], "codebooks": meta["codebooks"]},
                           {**a, "rows": np.asarray(s[2:])[None]})[0]

    @property
    def entries(self) -> "_Entries":
        """A read-only sequence of entry(i) (tests and tools; training reads __getitem__)."""
        return _Entries(self)

    def __getitem__(self, i: int):
        store, s = self._at(i)
        meta, a = store.shard(int(s[COL["shard"]]))
        t0, nt, c0, nc, s0, ns = (int(s[COL[c]]) for c in ROW[:6])
        e = {"input_ids": torch.from_numpy(np.array(a["input_ids"][t0:t0 + nt])),
             "label_ids": torch.from_numpy(np.array(a["label_ids"][t0:t0 + nt])),
             "audio_codes": torch.from_numpy(_codes(a, meta["codebooks"], c0, nc)),
             "audio_starts": torch.from_numpy(np.array(a["starts"][s0:s0 + ns]))}
        if self.whisper:  # audio-in clips are decoded at load: their paths
            e["audio_paths"] = meta["entries"][int(s[COL["entry"]])]["audio_paths"]
        return to_dataset_sample(e, self.audio_in_id, self.audio_out_id, self.whisper)


class _Entries:
    def __init__(self, dataset: CachedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.dataset.entry(j) for j in range(*i.indices(len(self)))]
        return self.dataset.entry(i)

    def __iter__(self):
        return (self.dataset.entry(i) for i in range(len(self)))
