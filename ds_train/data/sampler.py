"""Micro-batch plans: which samples each rank trains on, deterministic for (seed, epoch), resumable.

Two ways to cut an epoch into micro-batches:
- fixed size (`train.micro_batch_size` samples), in shuffled order;
- token budget (`data.max_tokens`): samples grouped by length so that (longest x count) <= max_tokens, which keeps
  padding low when lengths are skewed.
Either way the micro-batches are dealt round-robin over the global ranks, and their number is made a multiple of
world_size x grad_accum so every rank runs the same number of forwards per step (ZeRO-3 hangs otherwise).

A mix of manifests (data.train_files) is one list of samples, file after file, with a weight per file: a file of n
samples contributes round(weight x n) to each epoch, floor(weight) copies of every sample plus a seeded subset for
the fraction, another subset each epoch. The epoch's samples (repeats included) are then shuffled and batched as
above: all weights 1 plan exactly what one concatenated manifest would.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Optional, Sequence

import numpy as np

LENGTH_GROUP_FACTOR = 64  # sort by length within windows of this many micro-batches' worth of samples


class MicroBatchSampler:
    """A batch_sampler for DataLoader yielding this rank's micro-batches of one epoch, from `start` on.

    The epoch's plan is computed once per epoch, vectorised: one array of sample indices in plan order and the
    bounds of its micro-batches (O(N log N) at a million samples, no list per micro-batch). The order is the one
    Python's `random` draws for (seed, epoch), as before the plan was vectorised, so runs resume exactly."""

    def __init__(self, lengths: Sequence[int], rank: int, world: int, grad_accum: int, seed: int,
                 micro_batch_size: int = 1, max_tokens: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                 mix: Optional[Sequence[tuple[int, float]]] = None):
        self.lengths = np.asarray(lengths, np.int64)
        if max_tokens and len(self.lengths) and self.lengths.max() > max_tokens:
            longest = int(np.argmax(self.lengths))
            raise ValueError(f"sample {longest} has {self.lengths[longest]} tokens, more than "
                             f"data.max_tokens={max_tokens}")
        self.rank, self.world, self.accum = rank, world, grad_accum
        self.seed, self.mbs, self.max_tokens, self.shuffle = seed, micro_batch_size, max_tokens, shuffle
        # False (evaluation): keep every sample; ranks may then differ by one micro-batch, which the caller pads.
        self.drop_remainder = drop_remainder
        # (samples, weight) of each file, in the order of `lengths`; None: every sample once per epoch.
        if mix is not None and sum(n for n, _ in mix) != len(self.lengths):
            raise ValueError(f"mix covers {sum(n for n, _ in mix)} samples, lengths {len(self.lengths)}")
        self.mix = None if mix is None else [(int(n), float(w)) for n, w in mix]
        self.epoch, self.start = 0, 0
        self._plan_cache = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip this rank's first `start` micro-batches (resume)."""
        self.epoch, self.start = epoch, start

    def plan_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices in plan order, bounds): micro-batch b is indices[bounds[b]:bounds[b + 1]] and goes to
        rank b % world. Computed once per epoch."""
        if self._plan_cache and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = self.epoch_samples()
        if self.shuffle:
            rng.shuffle(order)
        order = np.asarray(order, np.int64)
        if self.max_tokens:
            flat, bounds = self._by_tokens(order, rng)
        else:
            flat, bounds = order, np.append(np.arange(0, len(order), self.mbs), len(order)).astype(np.int64)
        if self.drop_remainder:
            flat, bounds = _fit_multiple(flat, bounds, self.world * self.accum)
        self._plan_cache = (self.epoch, (flat, bounds))
        return flat, bounds

    def plan(self) -> list[list[int]]:
        """All micro-batches of the epoch as lists, global order (micro-batch b goes to rank b % world)."""
        flat, bounds = self.plan_arrays()
        return [flat[a:b].tolist() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

    def num_batches(self) -> int:
        return len(self.plan_arrays()[1]) - 1

    def epoch_size(self) -> int:
        """Samples per epoch, repeats included: len(epoch_samples()) without drawing them."""
        if self.mix is None:
            return len(self.lengths)
        return sum(per_epoch(n, weight) for n, weight in self.mix)

    def epoch_samples(self) -> list[int]:
        """The epoch's sample indices before shuffling, file after file: each file's samples floor(weight) times
        plus a subset of round(weight x n) - floor(weight) x n of them, drawn for (seed, epoch, file) alone."""
        if self.mix is None:
            return list(range(len(self.lengths)))
        out, start = [], 0
        for i, (n, weight) in enumerate(self.mix):
            block, whole = range(start, start + n), math.floor(weight)
            # Its own generator: the epoch's shuffle draws the same numbers whatever the weights.
            extra = random.Random(f"mix:{self.seed}:{self.epoch}:{i}").sample(block, per_epoch(n, weight) - whole * n)
            out += list(block) * whole + sorted(extra)
            start += n
        return out

    def _by_tokens(self, order: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """Within windows of the shuffled order, sort by length (stable) and cut greedily where the next sample
        would make longest x count exceed max_tokens; then shuffle the micro-batches."""
        lengths = self.lengths
        avg = max(1, int(lengths.sum()) // max(1, len(lengths)))
        window = max(1, (self.max_tokens // avg) * LENGTH_GROUP_FACTOR)
        chunks, cuts, done = [], [0], 0
        for w in range(0, len(order), window):
            chunk = order[w:w + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            lens = lengths[chunk]
            s = 0
            while s < len(chunk):
                # Sorted ascending: adding sample j makes lens[j] the longest. The cut comes within `cap` samples,
                # since past it (count + 1) x lens[j] >= (cap + 1) x lens[s] > max_tokens.
                cap = self.max_tokens // int(lens[s])
                seg = lens[s + 1:s + 1 + cap]
                over = np.flatnonzero(seg * np.arange(2, len(seg) + 2) > self.max_tokens)
                s = s + 1 + (int(over[0]) if len(over) else len(seg))
                cuts.append(done + s)
            chunks.append(chunk)
            done += len(chunk)
        flat = np.concatenate(chunks) if chunks else order
        bounds = np.asarray(cuts, np.int64)
        if self.shuffle:  # mix lengths across steps; within a batch they stay alike
            perm = list(range(len(bounds) - 1))
            rng.shuffle(perm)  # the draws of shuffling the list of batches: they depend on its length alone
            flat, bounds = _reorder(flat, bounds, np.asarray(perm, np.int64))
        return flat, bounds

    def rank_batches(self) -> list[list[int]]:
        flat, bounds = self.plan_arrays()
        return [flat[bounds[b]:bounds[b + 1]].tolist() for b in range(self.rank, len(bounds) - 1, self.world)]

    def first_batch(self) -> list[int]:
        flat, bounds = self.plan_arrays()
        return flat[bounds[0]:bounds[1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        flat, bounds = self.plan_arrays()
        for b in range(self.rank + self.start * self.world, len(bounds) - 1, self.world):
            yield flat[bounds[b]:bounds[b + 1]].tolist()

    def __len__(self) -> int:
        return len(range(self.rank, self.num_batches(), self.world)) - self.start

    def steps_per_epoch(self) -> int:
        return self.num_batches() // (self.world * self.accum)

    def padding_efficiency(self) -> float:
        """Real tokens / padded tokens over the epoch's micro-batches."""
        flat, bounds = self.plan_arrays()
        if len(bounds) < 2:
            return 1.0
        ls = self.lengths[flat]
        padded = int((np.maximum.reduceat(ls, bounds[:-1]) * np.diff(bounds)).sum())
        return int(ls.sum()) / padded if padded else 1.0

    def dropped(self) -> int:
        """The epoch's samples that fit no step (fixed-size micro-batches of single samples only)."""
        return self.epoch_size() - len(self.plan_arrays()[0])


def per_epoch(n: int, weight: float) -> int:
    """Samples a file of n samples contributes to each epoch at `weight`: round(weight x n), halves up."""
    return math.floor(weight * n + 0.5)


def _fit_multiple(flat: np.ndarray, bounds: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Make the number of micro-batches a multiple of `multiple`: split the largest (the first of equals) in
    halves (no sample lost); only when every batch is a single sample, drop the last few (reported by
    `dropped()`)."""
    while (len(bounds) - 1) % multiple:
        sizes = np.diff(bounds)
        largest = int(np.argmax(sizes))
        if sizes[largest] < 2:
            keep = len(bounds) - 1 - (len(bounds) - 1) % multiple
            return flat[:bounds[keep]], bounds[:keep + 1]
        bounds = np.insert(bounds, largest + 1, bounds[largest] + sizes[largest] // 2)
    return flat, bounds


def _reorder(flat: np.ndarray, bounds: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The micro-batches in the order `perm` (new batch k is old batch perm[k])."""
    sizes = np.diff(bounds)[perm]
    new_bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    shift = np.repeat(bounds[:-1][perm] - new_bounds[:-1], sizes)
    return flat[np.arange(len(flat)) + shift], new_bounds
