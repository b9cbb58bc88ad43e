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

LENGTH_GROUP_FACTOR = 64  # sort by length within windows of this many micro-batches' worth of samples


class MicroBatchSampler:
    """A batch_sampler for DataLoader yielding this rank's micro-batches of one epoch, from `start` on."""

    def __init__(self, lengths: Sequence[int], rank: int, world: int, grad_accum: int, seed: int,
                 micro_batch_size: int = 1, max_tokens: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                 mix: Optional[Sequence[tuple[int, float]]] = None):
        if max_tokens and max(lengths) > max_tokens:
            longest = max(range(len(lengths)), key=lambda i: lengths[i])
            raise ValueError(f"sample {longest} has {lengths[longest]} tokens, more than data.max_tokens={max_tokens}")
        self.lengths, self.rank, self.world, self.accum = list(lengths), rank, world, grad_accum
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

    def plan(self) -> list[list[int]]:
        """All micro-batches of the epoch, global order (micro-batch b goes to rank b % world)."""
        if self._plan_cache and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = self.epoch_samples()
        if self.shuffle:
            rng.shuffle(order)
        batches = self._by_tokens(order, rng) if self.max_tokens else self._by_count(order)
        if self.drop_remainder:
            batches = _fit_multiple(batches, self.world * self.accum)
        self._plan_cache = (self.epoch, batches)
        return batches

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
            block, whole = list(range(start, start + n)), math.floor(weight)
            # Its own generator: the epoch's shuffle draws the same numbers whatever the weights.
            extra = random.Random(f"mix:{self.seed}:{self.epoch}:{i}").sample(block, per_epoch(n, weight) - whole * n)
            out += block * whole + sorted(extra)
            start += n
        return out

    def _by_count(self, order: list[int]) -> list[list[int]]:
        return [order[i:i + self.mbs] for i in range(0, len(order), self.mbs)]

    def _by_tokens(self, order: list[int], rng: random.Random) -> list[list[int]]:
        avg = max(1, sum(self.lengths) // max(1, len(self.lengths)))
        window = max(1, (self.max_tokens // avg) * LENGTH_GROUP_FACTOR)
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: self.lengths[i])
            batch, longest = [], 0
            for i in chunk:
                longest_if = max(longest, self.lengths[i])
                if batch and longest_if * (len(batch) + 1) > self.max_tokens:
                    batches.append(batch)
                    batch, longest_if = [], self.lengths[i]
                batch.append(i)
                longest = longest_if
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)  # mix lengths across steps; within a batch they stay alike
        return batches

    def rank_batches(self) -> list[list[int]]:
        return self.plan()[self.rank::self.world]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches()[self.start:]

    def __len__(self) -> int:
        return len(self.rank_batches()) - self.start

    def steps_per_epoch(self) -> int:
        return len(self.plan()) // (self.world * self.accum)

    def padding_efficiency(self) -> float:
        """Real tokens / padded tokens over the epoch's micro-batches."""
        real = padded = 0
        for b in self.plan():
            ls = [self.lengths[i] for i in b]
            real += sum(ls)
            padded += max(ls) * len(ls)
        return real / padded if padded else 1.0

    def dropped(self) -> int:
        """The epoch's samples that fit no step (fixed-size micro-batches of single samples only)."""
        return self.epoch_size() - sum(len(b) for b in self.plan())


def per_epoch(n: int, weight: float) -> int:
    """Samples a file of n samples contributes to each epoch at `weight`: round(weight x n), halves up."""
    return math.floor(weight * n + 0.5)


def _fit_multiple(batches: list[list[int]], multiple: int) -> list[list[int]]:
    """Make len(batches) a multiple of `multiple`: split the largest batches (no sample lost); only when every
    batch is a single sample, drop the last few (reported by `dropped()`)."""
    batches = [list(b) for b in batches]
    while len(batches) % multiple:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            return batches[: len(batches) - len(batches) % multiple]
        b = batches[largest]
        batches[largest:largest + 1] = [b[: len(b) // 2], b[len(b) // 2:]]
    return batches
