"""Preference pairs for train.objective=dpo: the pairs file, the manifest it expands into, and the sampler that keeps
each pair's two samples together.

A pairs file is a JSONL of TTS manifest rows (`text`, optional `speaker`, `ref_audio` + `ref_text`, metadata) whose
`audio` is replaced by two clips for the same prompt: `chosen` and `rejected`. Each record becomes two ordinary rows
that share the prompt, chosen first, in a derived manifest (pairs_manifest): prepare, the cache and the collator
treat them as any clip. Line 2i-1 of that manifest is the chosen clip of the i-th good pair, line 2i its rejected
one; both rows name their pair in the `pair` key ("pairs.jsonl:LINE"), kept as metadata.

A pair is trained as one unit: both samples sit next to each other, chosen first, in the same micro-batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import Dataset

from ds_train import dist
from ds_train.data.manifest import raw_records, tts_to_chatml
from ds_train.data.sampler import MicroBatchSampler
from ds_train.errors import DataError
from ds_train.fsutil import atomic_write

ROLES = ("chosen", "rejected")


def pairs_manifest(data_cfg) -> Path:
    """Where data.pairs_file's derived manifest lives: next to its cache (data.cache_dir, or the default one)."""
    pairs = Path(data_cfg.pairs_file).resolve()
    if data_cfg.cache_dir:
        root = Path(data_cfg.cache_dir).resolve()
        return root.parent / f"{root.name}.pairs.jsonl"
    return pairs.parent / ".ds_train_cache" / f"{pairs.stem}.pairs.jsonl"


def write_pairs_manifest(cfg) -> Path:
    """Expand data.pairs_file into its manifest. Rank 0 alone reads the pairs file, and only when it changed since
    the last expansion (its path, size and mtime, with the settings the expansion depends on, are kept in the
    manifest's stamp): a relaunch does no per-record work on any rank. Every rank then acts on rank 0's verdict: a
    bad record stops them all with a DataError naming its line, or with data.skip_bad is left out and counted."""
    d = cfg.data
    out = pairs_manifest(d)
    verdict = _expand_on_main(d.pairs_file, d.system_prompt, out) if dist.is_main() else None
    verdict = dist.broadcast_object(verdict)
    if verdict["missing"]:
        raise FileNotFoundError(f"data.pairs_file not found: {d.pairs_file}")
    bad = verdict["bad"]
    if bad and not d.skip_bad:
        raise DataError(bad, d.pairs_file)
    if not verdict["pairs"]:
        raise DataError(bad or [{"source": os.path.basename(d.pairs_file), "reason": "no pairs"}], d.pairs_file)
    if bad:
        dist.print0(f"skipped {len(bad)} bad pair(s) of {d.pairs_file} (data.skip_bad=true): "
                    + ", ".join(b["source"] for b in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return out


STAMP_VERSION = 1


def _stamp_path(manifest: Path) -> Path:
    return manifest.with_name(manifest.name + ".stamp.json")


def _expand_on_main(pairs_file: str, system_prompt: str, out: Path) -> dict:
    """Rank 0's verdict on the pairs file, {missing, bad, pairs}: from the stamp when the file is unchanged,
    otherwise by expanding it (the manifest is rewritten only when its text changed, so the cache stays current)."""
    try:
        st = os.stat(pairs_file)
    except FileNotFoundError:
        return {"missing": True, "bad": [], "pairs": 0}
    key = {"version": STAMP_VERSION, "pairs_file": os.path.realpath(pairs_file), "size": st.st_size,
           "mtime_ns": st.st_mtime_ns, "system_prompt": system_prompt}
    stamp = _stamp_path(out)
    try:
        seen = json.loads(stamp.read_text())
        if seen["key"] == key and out.is_file():
            dist.print0(f"pairs: {out} is current ({seen['pairs']} pair(s), {len(seen['bad'])} bad)")
            return {"missing": False, "bad": seen["bad"], "pairs": seen["pairs"]}
    except (OSError, ValueError, KeyError):
        pass
    rows, bad = expand(pairs_file, system_prompt)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out.is_file() and out.read_text() == text):
        atomic_write(out, text)
    atomic_write(stamp, json.dumps({"key": key, "pairs": len(rows) // 2, "bad": bad}))
    dist.print0(f"pairs: expanded {len(rows) // 2} pair(s) of {pairs_file} into {out} ({len(bad)} bad)")
    return {"missing": False, "bad": bad, "pairs": len(rows) // 2}


def expand(path: str, system_prompt: str) -> tuple[list[dict], list[dict]]:
    """(the manifest rows of every good pair: chosen, rejected, ...; [{source, reason}] of the bad records). Audio
    paths become absolute (relative ones resolve against the pairs file's directory, as in a manifest)."""
    base = Path(path).resolve().parent
    rows, bad = [], []
    for source, raw, error in raw_records(path):
        if error is None:
            try:
                pair = [_row(raw, role, base, source) for role in ROLES]
                for row in pair:
                    tts_to_chatml(row, system_prompt)  # the manifest reader's checks, named by the pairs file's line
            except (ValueError, TypeError) as e:
                error = f"does not fit the schema: {e}"
        if error is not None:
            bad.append({"source": source, "reason": error})
            continue
        rows += pair
    return rows, bad


def _row(raw: dict, role: str, base: Path, source: str) -> dict:
    if "audio" in raw:
        raise ValueError("a pair has 'chosen' and 'rejected' audio instead of 'audio'")
    for key in ROLES:
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"'{key}' must be an audio path")
    if os.path.normpath(base / raw["chosen"]) == os.path.normpath(base / raw["rejected"]):
        raise ValueError("'chosen' and 'rejected' are the same clip")
    row = {k: v for k, v in raw.items() if k not in ROLES}
    row["audio"] = raw[role]
    for key in ("audio", "ref_audio"):
        if isinstance(row.get(key), str) and not os.path.isabs(row[key]) and "::" not in row[key]:
            row[key] = os.path.normpath(base / row[key])
    row.update(pair=source, role=role)
    return row


def pair_indices(record_numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(chosen sample indices, rejected sample indices, samples left without their partner) of a prepared pairs
    manifest whose samples have these record (line) numbers, in order. A partner is missing when prepare skipped
    its clip as bad (data.skip_bad) or it is longer than data.max_tokens."""
    lines = np.asarray(record_numbers, np.int64)
    if len(lines) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), len(lines)
    chosen = np.flatnonzero((lines[:-1] % 2 == 1) & (lines[1:] == lines[:-1] + 1))
    return chosen, chosen + 1, len(lines) - 2 * len(chosen)


class PairSampler:
    """The training plan over pairs: MicroBatchSampler's plan (deterministic, resumable, the same micro-batch count
    on every rank) with a pair as its unit, each micro-batch expanded to [chosen, rejected, chosen, rejected, ...].
    A pair's length for the token budget is twice its longer sample: both are padded to the batch's longest."""

    def __init__(self, chosen: np.ndarray, rejected: np.ndarray, sample_lengths, rank: int, world: int,
                 grad_accum: int, seed: int, micro_batch_size: int = 1, max_tokens: int = 0):
        self.chosen, self.rejected = np.asarray(chosen, np.int64), np.asarray(rejected, np.int64)
        lengths = np.asarray(sample_lengths, np.int64)
        self.pairs = MicroBatchSampler(2 * np.maximum(lengths[self.chosen], lengths[self.rejected]), rank, world,
                                       grad_accum, seed, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
        self.lengths = self.pairs.lengths

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.pairs:
            yield [int(i) for p in batch for i in (self.chosen[p], self.rejected[p])]

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.pairs.set_epoch(epoch, start)

    def steps_per_epoch(self) -> int:
        return self.pairs.steps_per_epoch()

    def num_batches(self) -> int:
        return self.pairs.num_batches()

    def epoch_size(self) -> int:
        """Samples per epoch (two per pair)."""
        return 2 * self.pairs.epoch_size()

    def dropped(self) -> int:
        return 2 * self.pairs.dropped()

    def padding_efficiency(self) -> float:
        return self.pairs.padding_efficiency()  # of the pairs' padded lengths: an estimate


class IndexedSamples(Dataset):
    """A training set as a PairSampler's loader reads it: (index, sample), so that each Batch of pairs knows its
    samples (ds_train.dpo looks their reference log-likelihoods up by index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]
