"""ds_train.data.sampler: deterministic, sharded, equal per rank, resumable micro-batch plans; token budgets."""

from __future__ import annotations

import random

import pytest

from ds_train.data.sampler import MicroBatchSampler


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Merged sequence lengths shaped like `make-demo-data --skewed`: most samples short, a tail 4-6x longer."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven bright stars sing".split()
    out = []
    for _ in range(n):
        k = rng.choices([2, 3, 3, 4, 14, 22], [0.35, 0.25, 0.15, 0.1, 0.1, 0.05])[0]
        chars = sum(len(rng.choice(words)) + 1 for _ in range(k))
        out.append(190 + chars + int(2.6 * chars))  # prompt + text + ~50 Hz audio codes of 0.05 s per character
    return out


def samplers(lengths, world, **kw):
    return [MicroBatchSampler(lengths, r, world, **kw) for r in range(world)]


@pytest.mark.parametrize("mode", [{"micro_batch_size": 3}, {"max_tokens": 2048}])
def test_plan_is_a_function_of_seed_and_epoch(mode):
    lengths = skewed_lengths(300)
    a = MicroBatchSampler(lengths, 0, 2, 2, seed=7, **mode)
    b = MicroBatchSampler(lengths, 0, 2, 2, seed=7, **mode)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert a.plan() == b.plan()
    a.set_epoch(0)
    epoch0 = a.plan()
    a.set_epoch(1)
    assert a.plan() != epoch0
    other_seed = MicroBatchSampler(lengths, 0, 2, 2, seed=8, **mode)
    assert other_seed.plan() != epoch0
    # every epoch covers the same samples
    assert sorted(i for b in a.plan() for i in b) == sorted(i for b in epoch0 for i in b)


@pytest.mark.parametrize("world,accum", [(1, 1), (3, 2), (4, 4)])
def test_ranks_split_the_plan_into_equal_disjoint_shares(world, accum):
    lengths = skewed_lengths(1001, seed=world)
    ranks = samplers(lengths, world, grad_accum=accum, seed=1, max_tokens=4096)
    plan = ranks[0].plan()
    assert len(plan) % (world * accum) == 0
    shares = [s.rank_batches() for s in ranks]
    assert len({len(s) for s in shares}) == 1  # same number of forwards on every rank (ZeRO-3 needs it)
    assert all(len(s) == ranks[0].steps_per_epoch() * accum for s in shares)
    for b, batch in enumerate(plan):  # micro-batch b goes to rank b % world, in order
        assert shares[b % world][b // world] == batch
    seen = sorted(i for s in shares for batch in s for i in batch)
    assert seen == list(range(len(lengths)))  # token budgets split batches, never drop a sample
    assert ranks[0].dropped() == 0


def test_token_budget_is_never_exceeded():
    lengths = skewed_lengths(2000)
    for max_tokens in (1200, 3000, 9000):
        s = MicroBatchSampler(lengths, 0, 2, 3, seed=0, max_tokens=max_tokens)
        for batch in s.plan():
            assert max(lengths[i] for i in batch) * len(batch) <= max_tokens


def test_sample_longer_than_budget_is_an_error():
    with pytest.raises(ValueError, match="sample 2 has 900 tokens, more than data.max_tokens=800"):
        MicroBatchSampler([100, 200, 900], 0, 1, 1, seed=0, max_tokens=800)


def test_fixed_size_batches_drop_only_what_does_not_fit_the_step():
    s = MicroBatchSampler(list(range(1, 11)), 0, 4, 1, seed=0, micro_batch_size=1)
    assert len(s.plan()) == 8 and s.dropped() == 2 and s.steps_per_epoch() == 2
    # batches of 3: 4 batches for 10 samples, split (not dropped) to make 8 = world x accum x 2
    s = MicroBatchSampler(list(range(1, 11)), 0, 2, 4, seed=0, micro_batch_size=3)
    assert len(s.plan()) == 8 and s.dropped() == 0
    assert sorted(i for b in s.plan() for i in b) == list(range(10))


def test_evaluation_plan_keeps_order_and_every_sample():
    s = MicroBatchSampler([5] * 7, 1, 2, 1, seed=0, micro_batch_size=2, shuffle=False, drop_remainder=False)
    assert s.plan() == [[0, 1], [2, 3], [4, 5], [6]]
    assert s.rank_batches() == [[2, 3], [6]]


@pytest.mark.parametrize("mode", [{"micro_batch_size": 2}, {"max_tokens": 3000}])
def test_resume_continues_the_same_epoch(mode):
    lengths = skewed_lengths(400)
    full = MicroBatchSampler(lengths, 1, 2, 2, seed=3, **mode)
    full.set_epoch(2)
    everything = list(full)
    for start in (0, 5, len(everything) - 1):
        resumed = MicroBatchSampler(lengths, 1, 2, 2, seed=3, **mode)  # a fresh process after restart
        resumed.set_epoch(2, start=start)
        assert len(resumed) == len(everything) - start
        assert list(resumed) == everything[start:]


def test_padding_efficiency_is_real_over_padded_positions():
    lengths = [10, 30, 20, 40, 50, 5, 25]
    s = MicroBatchSampler(lengths, 0, 1, 1, seed=0, max_tokens=100)
    real = padded = 0
    for batch in s.plan():
        real += sum(lengths[i] for i in batch)
        padded += max(lengths[i] for i in batch) * len(batch)
    assert s.padding_efficiency() == pytest.approx(real / padded, abs=1e-12)
    assert MicroBatchSampler([7] * 6, 0, 1, 1, seed=0, micro_batch_size=3).padding_efficiency() == 1.0


def test_token_budget_pads_little_where_random_batches_pad_much():
    lengths = skewed_lengths(5000)
    budget = MicroBatchSampler(lengths, 0, 8, 2, seed=0, max_tokens=4096)
    per_batch = round(len(lengths) / len(budget.plan()))
    fixed = MicroBatchSampler(lengths, 0, 8, 2, seed=0, micro_batch_size=per_batch)
    assert budget.padding_efficiency() >= 0.95
    assert fixed.padding_efficiency() <= 0.65
    # and the batches are not all alike in length: lengths still mix across steps
    longest = [max(lengths[i] for i in b) for b in budget.rank_batches()[:40]]
    assert max(longest) > 2 * min(longest)


# ---- a mix of manifests (data.train_files): weights are per-sample rates per epoch --------------------------------

MIX = [(40, 2.5), (25, 1.0), (35, 0.2)]  # (samples, weight) of three files, in the order of `lengths`
MODES = [{"micro_batch_size": 2}, {"max_tokens": 3000}]


def files_of(plan, mix) -> list[list[int]]:
    """Each file's sample indices in an epoch's plan, repeats included."""
    ends = [sum(n for n, _ in mix[:k + 1]) for k in range(len(mix))]
    out = [[] for _ in mix]
    for i in (i for b in plan for i in b):
        out[next(k for k, end in enumerate(ends) if i < end)].append(i)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_weights_give_each_file_round_weight_x_samples_per_epoch(mode):
    lengths = skewed_lengths(100)
    s = MicroBatchSampler(lengths, 0, 2, 1, seed=5, mix=MIX, **mode)
    subsets = []
    for epoch in range(4):
        s.set_epoch(epoch)
        assert s.dropped() == 0
        twice_and_a_half, once, some = files_of(s.plan(), MIX)
        assert (len(twice_and_a_half), len(once), len(some)) == (100, 25, 7)  # 2.5 x 40, 1 x 25, 0.2 x 35
        copies = {i: twice_and_a_half.count(i) for i in range(40)}
        assert sorted(copies.values()) == [2] * 20 + [3] * 20  # two full copies, half the file a third time
        assert sorted(once) == list(range(40, 65))
        assert len(set(some)) == 7 and set(some) <= set(range(65, 100))
        subsets.append((frozenset(i for i, c in copies.items() if c == 3), frozenset(some)))
    assert len(set(subsets)) == 4  # another fractional subset in every epoch


@pytest.mark.parametrize("mode", MODES)
def test_weighted_plan_is_the_same_on_every_rank_and_resumes(mode):
    lengths = skewed_lengths(100)
    ranks = samplers(lengths, 3, grad_accum=2, seed=5, mix=MIX, **mode)
    for s in ranks:
        s.set_epoch(3)
    plan = ranks[0].plan()
    assert all(s.plan() == plan for s in ranks)
    shares = [s.rank_batches() for s in ranks]
    assert len({len(x) for x in shares}) == 1 and len(plan) == 3 * len(shares[0])
    for b, batch in enumerate(plan):
        assert shares[b % 3][b // 3] == batch
    if "micro_batch_size" in mode:  # fixed-size plans: the same number of steps in every epoch
        steps = set()
        for epoch in range(5):
            ranks[0].set_epoch(epoch)
            steps.add(ranks[0].steps_per_epoch())
        assert steps == {len(plan) // 6}
    everything, start = shares[1], len(shares[1]) // 2
    resumed = MicroBatchSampler(lengths, 1, 3, 2, seed=5, mix=MIX, **mode)  # a fresh process after a restart
    resumed.set_epoch(3, start=start)
    assert start >= 2 and list(resumed) == everything[start:]


@pytest.mark.parametrize("mode", MODES)
def test_all_weights_1_plan_what_one_concatenated_manifest_did(mode):
    lengths = skewed_lengths(100)
    for epoch in (0, 1, 6):
        one = MicroBatchSampler(lengths, 0, 2, 2, seed=9, **mode)
        mixed = MicroBatchSampler(lengths, 0, 2, 2, seed=9, mix=[(30, 1), (70, 1.0)], **mode)
        one.set_epoch(epoch)
        mixed.set_epoch(epoch)
        assert mixed.plan() == one.plan()
        assert mixed.padding_efficiency() == one.padding_efficiency() and mixed.dropped() == one.dropped()
