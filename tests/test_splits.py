"""Held-out validation identities are disjoint from training and test."""

from pathlib import Path

import pytest

from data.readers import DatasetSplits, EvalSplit, TrainSample
from data.splits import hold_out_identities


def _splits() -> DatasetSplits:
    train = [
        TrainSample(pid=pid, image_id=pid * 2 + k, image_path=Path(f"{pid}_{k}.png"), caption=f"p{pid} i{k} c{c}")
        for pid in range(10)
        for k in range(2)
        for c in range(2)
    ]
    test = EvalSplit(
        image_pids=[100, 101], image_paths=[Path("a"), Path("b")], caption_pids=[100, 101], captions=["x", "y"]
    )
    return DatasetSplits(name="VN3K_VI", root=Path("."), train=train, val=None, test=test)


def test_hold_out_is_by_identity_and_keeps_training_pids_contiguous():
    result = hold_out_identities(_splits(), 3, seed=0)
    val_ids = set(result.val.image_pids)
    assert len(val_ids) == 3 and set(result.val.caption_pids) == val_ids
    assert len(result.val.image_paths) == 6 and len(result.val.captions) == 12
    held_paths = set(result.val.image_paths)
    assert not held_paths & {s.image_path for s in result.train}
    assert sorted({s.pid for s in result.train}) == list(range(7))
    assert result.test == _splits().test


def test_hold_out_is_deterministic_per_seed():
    assert hold_out_identities(_splits(), 3, 0).val == hold_out_identities(_splits(), 3, 0).val
    assert hold_out_identities(_splits(), 3, 0).val != hold_out_identities(_splits(), 3, 5).val


@pytest.mark.parametrize("n", [0, 10])
def test_hold_out_size_must_leave_training_identities(n):
    with pytest.raises(ValueError, match="val_identities"):
        hold_out_identities(_splits(), n, 0)
