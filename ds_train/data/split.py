"""data.eval_split: hold out a fraction of the training samples as the eval set, when no eval file is given.

Each training manifest is split on its own, so the eval set has the mix of the training files and a file's split
does not change when another file is added. Within a file, whole speakers are held out when its records name
speakers (a voice the adapter never trained on is what tells over-fitting from learning), otherwise single
samples. Units (speakers, or samples without a speaker) are taken in an order drawn from train.seed and the file's
name until they hold at least the fraction of the file's samples; at least one unit always stays in training, and a
file with a single speaker is split by sample.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ds_train.data.cache import CachedDataset
from ds_train.data.manifest import speakers_by_source
from ds_train.errors import ConfigError

SHOWN_SPEAKERS = 10  # speakers named in the printed line per file


@dataclass
class HeldOut:
    indices: list[int]  # positions in the file's samples, ascending
    speakers: list[str] = field(default_factory=list)  # whole speakers held out; [] when split by sample


def hold_out(speakers: Sequence[Optional[str]], fraction: float, seed: int, name: str) -> HeldOut:
    """Which of a file's samples (given each one's speaker, or None) the eval set takes; see the module doc."""
    units: dict[tuple, list[int]] = {}
    for i, speaker in enumerate(speakers):
        units.setdefault(("speaker", speaker) if speaker else ("sample", i), []).append(i)
    if len(units) == 1:  # one speaker: holding it out would leave nothing to train on
        units = {("sample", i): [i] for i in range(len(speakers))}
    keys = sorted(units, key=lambda k: (k[0], str(k[1])))
    random.Random(f"eval_split:{seed}:{name}").shuffle(keys)
    target = math.ceil(fraction * len(speakers) - 1e-9)
    taken, count = [], 0
    for key in keys[:-1]:  # the last unit always trains
        if count >= target:
            break
        taken.append(key)
        count += len(units[key])
    return HeldOut(sorted(i for k in taken for i in units[k]),
                   sorted(k[1] for k in taken if k[0] == "speaker"))


@dataclass
class EvalSplit:
    train: list[CachedDataset]  # each file's training samples
    eval: CachedDataset  # the held-out samples of all files, file after file
    held_out: dict[str, set[str]]  # {manifest: sources of its held-out samples}
    line: str  # what was held out, for the log


def split_eval(parts: list[CachedDataset], manifests: list[str], fraction: float, seed: int, fmt: str = "auto",
               columns: Optional[dict] = None) -> EvalSplit:
    """Split each file's samples (`parts`, in the order of `manifests`, read as data.format and data.columns say)
    into training and held-out samples."""
    train, held, held_out, said = [], [], {}, []
    for part, manifest in zip(parts, manifests):
        by_source = speakers_by_source(manifest, fmt, columns)
        name = Path(manifest).name
        out = hold_out([by_source.get(s) for s in part.sources()], fraction, seed, name)
        keep = np.ones(len(part), bool)
        keep[out.indices] = False
        train.append(part.subset(np.flatnonzero(keep)))
        held.append(part.subset(out.indices))
        held_out[manifest] = set(part.sources(out.indices))
        if out.speakers:
            shown = ", ".join(out.speakers[:SHOWN_SPEAKERS]) + (" ..." if len(out.speakers) > SHOWN_SPEAKERS else "")
            said.append(f"{name}: {len(out.indices):,} of {len(part):,} samples, {len(out.speakers)} speaker(s) "
                        f"({shown})")
        else:
            said.append(f"{name}: {len(out.indices):,} of {len(part):,} samples (by sample)")
    eval_set = CachedDataset.concat(held)
    if not len(eval_set):
        raise ConfigError(f"data.eval_split={fraction} holds out no sample ({'; '.join(said)}): give a larger "
                          "fraction or data.eval_file")
    return EvalSplit(train, eval_set, held_out, f"data.eval_split={fraction} held out " + "; ".join(said))
