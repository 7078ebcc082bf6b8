"""Identity sampler: batch composition, determinism, replacement and batch counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data.samplers import IdentitySampler


def make_data(images_per_pid: dict[int, int], captions_per_image: int) -> tuple[list[int], list[int]]:
    """Per-caption pids and image ids, with identities interleaved so indices of one pid are not contiguous."""
    entries = [
        (pid, pid * 100 + image)
        for pid, n in images_per_pid.items()
        for image in range(n)
        for _ in range(captions_per_image)
    ]
    random.Random(0).shuffle(entries)
    return [pid for pid, _ in entries], [image for _, image in entries]


def batches(sampler: IdentitySampler) -> list[list[int]]:
    indices = list(sampler)
    assert len(indices) == len(sampler)
    size = sampler.batch_size
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def greedy_batches(chunk_counts: list[int], ids_per_batch: int) -> int:
    """Slow reference: repeatedly take one chunk from each of the P identities with the most chunks left."""
    counts = list(chunk_counts)
    made = 0
    while sum(c > 0 for c in counts) >= ids_per_batch:
        for i in sorted(range(len(counts)), key=lambda i: -counts[i])[:ids_per_batch]:
            counts[i] -= 1
        made += 1
    return made


def test_batches_hold_p_identities_of_k_distinct_images() -> None:
    # 4 images x 3 captions per pid, K = 4: the seed (grouped by image id) would put one image 4 times.
    pids, image_ids = make_data({pid: 4 for pid in range(12)}, captions_per_image=3)
    sampler = IdentitySampler(pids, image_ids, batch_size=12, num_instance=4)
    result = batches(sampler)
    assert len(result) == 12  # 12 pids x 3 chunks of 4 = 36 chunks, 3 per batch
    for batch in result:
        groups = [batch[i : i + 4] for i in range(0, 12, 4)]
        assert len({pids[g[0]] for g in groups}) == 3
        for group in groups:
            assert {pids[i] for i in group} == {pids[group[0]]}
            assert len({image_ids[i] for i in group}) == 4
    # Enough chunks for a perfect deal: every caption is used exactly once.
    assert sorted(i for b in result for i in b) == list(range(len(pids)))


def test_fewer_images_than_k_uses_distinct_captions() -> None:
    pids, image_ids = make_data({pid: 2 for pid in range(6)}, captions_per_image=2)
    sampler = IdentitySampler(pids, image_ids, batch_size=8, num_instance=4)
    for batch in batches(sampler):
        for start in range(0, 8, 4):
            group = batch[start : start + 4]
            assert len(set(group)) == 4  # no repeats: the pid has exactly K captions
            assert Counter(image_ids[i] for i in group).most_common(1)[0][1] == 2


def test_replacement_only_for_identities_with_fewer_than_k_samples() -> None:
    sizes = {0: 1, 1: 3, 2: 4, 3: 9, 4: 5, 5: 2, 6: 4}  # 8 chunks of 4: all dealt into 4 batches of 2
    pids, image_ids = make_data(sizes, captions_per_image=1)
    sampler = IdentitySampler(pids, image_ids, batch_size=8, num_instance=4)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        used = Counter(i for b in batches(sampler) for i in b)
        for index, count in used.items():
            n = sizes[pids[index]]
            if n >= 4:
                assert count == 1
            else:
                assert count >= 1 and sum(c for i, c in used.items() if pids[i] == pids[index]) == 4
        # The 3-sample identity keeps all three and repeats exactly one.
        assert sorted(c for i, c in used.items() if pids[i] == 1) == [1, 1, 2]


def test_deterministic_per_epoch_and_seed() -> None:
    pids, image_ids = make_data({pid: 3 for pid in range(20)}, captions_per_image=2)
    first = IdentitySampler(pids, image_ids, batch_size=8, num_instance=2, seed=3)
    second = IdentitySampler(pids, image_ids, batch_size=8, num_instance=2, seed=3)
    orders = []
    for epoch in (0, 1):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        orders.append(list(first))
        assert orders[-1] == list(second) == list(first)
    assert orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1])
    assert list(IdentitySampler(pids, image_ids, batch_size=8, num_instance=2, seed=4)) != orders[0]


def test_length_is_exact_and_stable_when_identities_are_skewed() -> None:
    # One identity with 20 chunks and three with one: only 3 batches can hold 2 distinct identities.
    pids, image_ids = make_data({0: 40, 1: 2, 2: 2, 3: 2}, captions_per_image=1)
    sampler = IdentitySampler(pids, image_ids, batch_size=4, num_instance=2)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        result = batches(sampler)
        assert len(sampler) == 12 and len(result) == 3
        for batch in result:
            assert pids[batch[0]] != pids[batch[2]]
            assert pids[batch[0]] == pids[batch[1]] and pids[batch[2]] == pids[batch[3]]
        assert {pids[i] for b in result for i in b} == {0, 1, 2, 3}


@pytest.mark.parametrize("trial", range(20))
def test_batch_count_matches_greedy_reference(trial: int) -> None:
    rng = random.Random(trial)
    sizes = {pid: rng.choice([1, 2, 3, 5, 8, 13, 30]) for pid in range(rng.randint(3, 12))}
    k, p = rng.choice([1, 2, 4]), rng.randint(2, 3)
    pids, image_ids = make_data(sizes, captions_per_image=1)
    sampler = IdentitySampler(pids, image_ids, batch_size=p * k, num_instance=k)
    expected = greedy_batches([max(n, k) // k for n in sizes.values()], p)
    result = batches(sampler)
    assert len(result) == expected
    for batch in result:
        assert len({pids[i] for i in batch}) == p


def test_every_identity_used_when_counts_allow() -> None:
    # CUHK-like: about one chunk per identity, so an epoch covers all identities except the last partial batch.
    pids, image_ids = make_data({pid: 2 for pid in range(27)}, captions_per_image=2)
    sampler = IdentitySampler(pids, image_ids, batch_size=24, num_instance=4)
    seen = {pids[i] for b in batches(sampler) for i in b}
    assert len(sampler) == 4 * 24 and len(seen) == 24


@pytest.mark.parametrize(
    ("batch_size", "num_instance", "match"),
    [
        (10, 4, "multiple of num_instance"),
        (0, 4, "multiple of num_instance"),
        (8, 0, "multiple of num_instance"),
        (24, 4, "needs 6 training identities.*has 5"),
    ],
)
def test_invalid_arguments(batch_size: int, num_instance: int, match: str) -> None:
    pids, image_ids = make_data({pid: 4 for pid in range(5)}, captions_per_image=1)
    with pytest.raises(ValueError, match=match):
        IdentitySampler(pids, image_ids, batch_size=batch_size, num_instance=num_instance)


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        IdentitySampler([0, 1], [0], batch_size=2, num_instance=1)


def _identities_per_batch(sampler: IdentitySampler, pids: list[int]) -> list[set[int]]:
    return [{pids[i] for i in batch} for batch in batches(sampler)]


def test_identities_meet_at_random_not_in_the_same_groups_again() -> None:
    # 600 people x 8 samples, K = 4: each person fills two batches of 6 people. If P identities were drawn at random
    # per batch (the re-ID convention), the two batches of a person would share about (P - 1)^2 / (N - 1) = 0.04
    # other people on average; dealing a person's chunks to neighbouring batches shares all 5 every time.
    pids, image_ids = make_data({pid: 8 for pid in range(600)}, captions_per_image=1)
    sampler = IdentitySampler(pids, image_ids, batch_size=24, num_instance=4, seed=2307)
    where: dict[int, list[set[int]]] = {}
    for members in _identities_per_batch(sampler, pids):
        for pid in members:
            where.setdefault(pid, []).append(members - {pid})
    assert all(len(batches_of) == 2 for batches_of in where.values())
    shared = [len(first & second) for first, second in where.values()]
    assert sum(shared) / len(shared) < 0.25


def test_every_pair_of_identities_meets_about_equally_often() -> None:
    # 12 people x 16 samples, K = 4, P = 3: 16 batches of 3 people (48 meetings of pairs) per epoch. Over 200 epochs a
    # uniform draw gives each of the 66 pairs 9600 / 66 = 145 meetings (standard deviation about 12).
    pids, image_ids = make_data({pid: 16 for pid in range(12)}, captions_per_image=1)
    sampler = IdentitySampler(pids, image_ids, batch_size=12, num_instance=4, seed=1)
    meetings: Counter = Counter()
    for epoch in range(200):
        sampler.set_epoch(epoch)
        for members in _identities_per_batch(sampler, pids):
            assert len(members) == 3
            meetings.update((a, b) for a in members for b in members if a < b)
    assert len(meetings) == 66
    assert 145 * 0.7 < min(meetings.values()) and max(meetings.values()) < 145 * 1.3
