"""LengthGroupedSampler: equal disjoint shards, determinism, length grouping, modality separation,
and resume-from-state equal to an uninterrupted run."""
import numpy as np
import pytest

from vittle_fast.data import LengthGroupedSampler

N = 53


def make_lengths(n=N, seed=1):
    rng = np.random.default_rng(seed)
    return rng.permutation(n).tolist(), (rng.random(n) < 0.4).tolist()


def shards(lengths, is_mm, world, **kwargs):
    return [list(LengthGroupedSampler(lengths, is_mm, num_replicas=world, rank=r, **kwargs))
            for r in range(world)]


def global_batches(per_rank, batch_size):
    """Step k's samples on all ranks: micro-batch k of each rank."""
    n_steps = len(per_rank[0]) // batch_size
    return [sum((rank[k * batch_size:(k + 1) * batch_size] for rank in per_rank), [])
            for k in range(n_steps)]


def test_shards_are_equal_and_disjoint_with_drop_last():
    lengths, is_mm = make_lengths()
    per_rank = shards(lengths, is_mm, world=3, batch_size=2, drop_last=True)
    assert len({len(s) for s in per_rank}) == 1
    everything = sum(per_rank, [])
    assert len(set(everything)) == len(everything)  # disjoint, no repeats
    n_mm = sum(is_mm)
    assert len(everything) == n_mm // 6 * 6 + (N - n_mm) // 6 * 6


def test_shards_cover_everything_without_drop_last():
    lengths, is_mm = make_lengths()
    sampler = LengthGroupedSampler(lengths, is_mm, batch_size=2, num_replicas=3, rank=0)
    per_rank = shards(lengths, is_mm, world=3, batch_size=2)
    assert all(len(s) == len(sampler) == sampler.num_samples for s in per_rank)
    everything = sum(per_rank, [])
    assert set(everything) == set(range(N))
    # only wrap-around repeats: fewer than one global batch (6) per modality
    assert len(everything) - N < 2 * 6


def test_deterministic_given_seed_and_epoch():
    lengths, is_mm = make_lengths()
    a = LengthGroupedSampler(lengths, is_mm, batch_size=4, seed=7)
    b = LengthGroupedSampler(lengths, is_mm, batch_size=4, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    first_epoch = list(LengthGroupedSampler(lengths, is_mm, batch_size=4, seed=7))
    assert list(a) == list(b) != first_epoch
    assert list(LengthGroupedSampler(lengths, is_mm, batch_size=4, seed=8)) != first_epoch


def test_every_step_holds_one_modality():
    lengths, is_mm = make_lengths()
    per_rank = shards(lengths, is_mm, world=2, batch_size=3, seed=3)
    steps = global_batches(per_rank, 3)
    assert {len({is_mm[i] for i in step}) for step in steps} == {1}
    assert {is_mm[step[0]] for step in steps} == {True, False}  # both modalities occur


def test_lengths_are_grouped():
    """One mega-batch covering the data: each step takes the next 8 lengths in sorted order."""
    lengths = np.random.default_rng(0).permutation(64).tolist()
    per_rank = shards(lengths, [False] * 64, world=2, batch_size=4, mega_batch_mult=8)
    steps = global_batches(per_rank, 4)
    assert sorted(sorted(lengths[i] for i in step) for step in steps) == \
        [list(range(k, k + 8)) for k in range(0, 64, 8)]
    # and the steps are not in length order (batches are shuffled after grouping)
    assert [max(lengths[i] for i in step) for step in steps] != sorted(
        (max(lengths[i] for i in step) for step in steps), reverse=True)


def test_small_mega_batches_group_within_each():
    lengths = np.random.default_rng(0).permutation(64).tolist()
    per_rank = shards(lengths, [False] * 64, world=1, batch_size=4, mega_batch_mult=2)
    grouped = per_rank[0]
    for start in range(0, 64, 4):  # each micro-batch is a slice of a length-sorted mega-batch
        batch_lengths = [lengths[i] for i in grouped[start:start + 4]]
        assert batch_lengths == sorted(batch_lengths, reverse=True)
    waste = sum(max(lengths[i] for i in grouped[k:k + 4]) * 4 - sum(lengths[i] for i in grouped[k:k + 4])
                for k in range(0, 64, 4))
    unsorted = np.random.default_rng(1).permutation(64)
    random_waste = sum(max(lengths[i] for i in unsorted[k:k + 4]) * 4
                       - sum(lengths[i] for i in unsorted[k:k + 4]) for k in range(0, 64, 4))
    assert waste < 0.8 * random_waste  # sorting 8 lengths into 2 batches of 4: ~35% less padding


@pytest.mark.parametrize("stop_after", [0, 3, 8])
def test_resume_from_state_equals_uninterrupted(stop_after):
    lengths, is_mm = make_lengths()
    kwargs = dict(batch_size=2, num_replicas=2, rank=1, seed=5)
    uninterrupted = LengthGroupedSampler(lengths, is_mm, **kwargs)
    expected = []
    for epoch in range(2):
        uninterrupted.set_epoch(epoch)
        expected += list(uninterrupted)

    first = LengthGroupedSampler(lengths, is_mm, **kwargs)
    consumed = list(first)[:stop_after * 2]  # the DataLoader may have prefetched more than this
    first.advance(stop_after)
    state = first.state_dict()

    resumed = LengthGroupedSampler(lengths, is_mm, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a trainer's epoch loop re-entering the saved epoch keeps the position
    assert len(resumed) == resumed.num_samples - stop_after * 2
    seen = consumed + list(resumed)
    resumed.set_epoch(1)
    assert seen + list(resumed) == expected


def test_state_from_another_configuration_is_rejected():
    lengths, is_mm = make_lengths()
    state = LengthGroupedSampler(lengths, is_mm, batch_size=2, num_replicas=2, rank=0).state_dict()
    other_world = LengthGroupedSampler(lengths, is_mm, batch_size=2, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="num_samples"):
        other_world.load_state_dict(state)
    sampler = LengthGroupedSampler(lengths, is_mm, batch_size=2)
    with pytest.raises(ValueError, match="past the epoch"):
        sampler.advance(sampler.num_samples)


def test_validates_arguments():
    with pytest.raises(ValueError, match="same length"):
        LengthGroupedSampler([1, 2], [True], batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler([1], [True], batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler([1], [True], batch_size=1, num_replicas=2, rank=2)
