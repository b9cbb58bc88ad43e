"""The prepared cache: the one owner of its format, writer and reader.

cache_dir/
  fingerprint.json    what produces the codes (tokenizers, settings); written before any shard
  index.json          fingerprint, shard count, sample count, bad-sample report; written last
  shard-00000.pt ...  records [k*S, (k+1)*S) of the manifest: token ids, labels, audio codes, provenance
  shard-00000.lock    only while a `prepare` run encodes shard 0 (see prepare.py)
  piece-00000-00013-00026.pt   only while shard 0 is encoded: the records of it one rank encoded (here 13-25)

Shard k always holds the same records whatever the number of ranks, so a cache made by 8 processes equals one made
by 1: it is assembled from its pieces in record order, however many ranks encoded them. A shard is current when its
record keys and fingerprint match; a cache made with other settings is an error, never a silent mix.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from ds_train import dist
from ds_train.config import Config, flatten
from ds_train.data.audio import tokenizer_fingerprint
from ds_train.data.collate import to_dataset_sample
from ds_train.data.manifest import Record
from ds_train.data.validate import duration_problem
from ds_train.errors import CacheMismatchError
from ds_train.fsutil import atomic_write, replacing

CACHE_VERSION = 5  # 3: tokenizer and records fingerprinted by content; 4: clips resampled as the serve engine
# loads references (librosa soxr_hq), not torchaudio; 5: clip durations kept, duration limits applied at load


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
                     "shard_size": d.shard_size},
    }


def _fingerprint_hash(fp: dict) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _shard_path(cache: Path, k: int) -> Path:
    return cache / f"shard-{k:05d}.pt"


def stored_bad(cache: Path, k: int, records: list[Record], fp: dict, limits) -> Optional[list[dict]]:
    """The bad-sample list of shard k under the duration `limits` (min, max seconds) when the shard is current
    (same records, same fingerprint, no clip left out for a limit it now meets); None when it must be encoded."""
    p = _shard_path(cache, k)
    if not p.is_file():
        return None
    shard = torch.load(p, weights_only=False, mmap=True)
    if shard.get("fingerprint") != _fingerprint_hash(fp) or shard["keys"] != [r.key for r in records]:
        return None
    if any("seconds" in b and duration_problem(b["seconds"], *limits) is None for b in shard["bad"]):
        return None  # a clip that was too long or short fits now: encode the shard again to include it
    return rejudge(shard, limits)


def rejudge(shard: dict, limits) -> list[dict]:
    """A shard's bad samples under `limits`, in manifest order: the stored ones (a clip left out for a duration
    limit is still outside it: stored_bad checked) plus encoded samples with a clip outside the limits now."""
    bad = list(shard["bad"])
    for e in shard["entries"]:
        outside = _outside(e, limits)
        if outside:
            path, s, why = outside
            bad.append({"source": e["source"], "reason": f"{why}: {path}", "clip": path, "seconds": s})
    return sorted(bad, key=lambda b: int(b["source"].rsplit(":", 1)[1]))


def _outside(entry: dict, limits) -> Optional[tuple[str, float, str]]:
    """(path, seconds, reason) of the first clip of an encoded sample outside the duration limits; None if none."""
    for path, s in zip(entry["audio_paths"], entry["clip_seconds"]):
        why = duration_problem(s, *limits)
        if why:
            return path, s, why
    return None


def within_limits(entry: dict, limits) -> bool:
    return _outside(entry, limits) is None


def write_shard(cache: Path, k: int, records: list[Record], fp: dict, entries: list[dict], bad: list[dict]) -> None:
    with replacing(_shard_path(cache, k)) as tmp:  # readers see a whole shard or none
        torch.save({"fingerprint": _fingerprint_hash(fp), "keys": [r.key for r in records], "entries": entries,
                    "bad": bad}, tmp)


def lock_path(cache: Path, k: int) -> Path:
    return cache / f"shard-{k:05d}.lock"


def write_piece(cache: Path, k: int, fp: dict, done: list[tuple]) -> None:
    """Records of shard k that one rank encoded: `done` holds (index in the shard, record key, cache entry or None,
    bad-sample dict or None), in index order."""
    path = cache / f"piece-{k:05d}-{done[0][0]:05d}-{done[-1][0] + 1:05d}.pt"
    with replacing(path) as tmp:  # a crash leaves whole pieces or none: a re-run reuses them
        torch.save({"fingerprint": _fingerprint_hash(fp), "done": done}, tmp)


def read_pieces(cache: Path, k: int, records: list[Record], fp: dict) -> dict[int, tuple]:
    """{index: (entry or None, bad or None)} of the records of shard k some piece holds for their current key."""
    out = {}
    for path in sorted(cache.glob(f"piece-{k:05d}-*.pt")):
        piece = torch.load(path, weights_only=False)
        if piece["fingerprint"] != _fingerprint_hash(fp):
            continue
        for i, key, entry, bad in piece["done"]:
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
    for path in cache.glob("piece-*.pt" if k is None else f"piece-{k:05d}-*.pt"):
        path.unlink(missing_ok=True)


def claim_cache(cache: Path, fp: dict) -> None:
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
        atomic_write(path, json.dumps(fp, indent=1))
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


def write_index(cache: Path, fp: dict, manifest: str, num_shards: int, limits) -> dict:
    bad, count, no_audio = [], 0, []
    for k in range(num_shards):
        shard = torch.load(_shard_path(cache, k), weights_only=False, mmap=True)
        bad += rejudge(shard, limits)
        used = [e for e in shard["entries"] if within_limits(e, limits)]
        count += len(used)
        no_audio += [e["source"] for e in used if not e["trains_audio"]]
    for old in cache.glob("shard-*.pt"):  # the manifest shrank: shards past its end are not part of it
        if int(old.stem.split("-")[1]) >= num_shards:
            old.unlink()
    remove_pieces(cache)  # every shard is current now: pieces are leftovers of a run stopped after assembling
    index = {"fingerprint": fp, "manifest": str(Path(manifest).resolve()), "num_shards": num_shards,
             "audio_seconds": list(limits),  # the duration limits CachedDataset applies
             "num_samples": count, "bad": bad, "no_trainable_audio": no_audio}
    atomic_write(cache / "index.json", json.dumps(index, indent=1))
    return index


class CachedDataset(Dataset):
    """Samples of a prepared cache, in manifest order."""

    def __init__(self, cache_dir: str | Path, model_config, whisper: bool = False):
        cache = Path(cache_dir)
        index_path = cache / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no prepared cache at {cache}: run `ds-train prepare CONFIG` first")
        self.index = json.loads(index_path.read_text())
        self.entries = []
        limits = self.index["audio_seconds"]
        for k in range(self.index["num_shards"]):
            shard = torch.load(_shard_path(cache, k), weights_only=False, mmap=True)
            self.entries += [e for e in shard["entries"] if within_limits(e, limits)]
        self.audio_in_id = model_config.audio_in_token_idx
        self.audio_out_id = model_config.audio_out_token_idx
        self.num_codebooks = model_config.audio_num_codebooks
        self.delay = bool(model_config.use_delay_pattern)
        self.whisper = whisper
        for e in self.entries:
            if e["audio_codes"].shape[0] < self.num_codebooks:
                raise ValueError(f"{e['source']}: cached audio has {e['audio_codes'].shape[0]} codebooks, "
                                 f"the model needs {self.num_codebooks} (audio tokenizer does not match the model)")
        self.lengths = [self.merged_length(e) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, indices) -> "CachedDataset":
        """A dataset of these samples only (a held-out eval set); this one is left as it is."""
        part = copy.copy(self)
        part.entries = [self.entries[i] for i in indices]
        part.lengths = [self.lengths[i] for i in indices]
        return part

    @staticmethod
    def concat(parts: list["CachedDataset"]) -> "CachedDataset":
        """Several manifests' samples as one dataset, in list order (data.train_files)."""
        whole = copy.copy(parts[0])
        whole.index = None  # no single index.json describes it
        whole.entries = [e for p in parts for e in p.entries]
        whole.lengths = [n for p in parts for n in p.lengths]
        return whole

    def drop(self, indices) -> None:
        """Leave samples out (skipped as bad after preparation, e.g. longer than data.max_tokens)."""
        gone = set(indices)
        self.entries = [e for i, e in enumerate(self.entries) if i not in gone]
        self.lengths = [n for i, n in enumerate(self.lengths) if i not in gone]

    def merged_length(self, e: dict) -> int:
        """Sequence length after the model merges audio-out codes into the text stream (what costs compute)."""
        ids = e["input_ids"]
        out_positions = (ids == self.audio_out_id).nonzero().flatten().tolist()
        audio_ids = (ids == self.audio_in_id) | (ids == self.audio_out_id)
        order = audio_ids.nonzero().flatten().tolist()
        starts = e["audio_starts"].tolist() + [e["audio_codes"].shape[1]]
        extra = 0
        for j, pos in enumerate(order):
            if pos in out_positions:
                extra += starts[j + 1] - starts[j] + 2 + (self.num_codebooks - 1 if self.delay else 0) - 1
        return len(ids) + extra

    def __getitem__(self, i: int):
        return to_dataset_sample(self.entries[i], self.audio_in_id, self.audio_out_id, self.whisper)
