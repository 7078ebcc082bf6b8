"""DeferredScalars hands out each entry only once `lag` newer ones exist, oldest first, with the values put."""

from __future__ import annotations

import pytest
import torch

from utils.deferred import DeferredScalars


@pytest.mark.parametrize("lag", [0, 1, 2, 5])
def test_entries_are_released_lag_puts_later_in_order_with_their_values(lag):
    queue = DeferredScalars(lag)
    released = []
    for step in range(8):
        queue.put(step, {"loss": torch.tensor(step / 4), "flag": torch.tensor(step % 2 == 1)})
        now = queue.take()
        # after put number `step` (0-based), exactly the entry put `lag` puts earlier comes out, once
        assert [key for key, _ in now] == ([step - lag] if step >= lag else [])
        released += now
    assert len(queue) == min(lag, 8)
    released += queue.take(everything=True)
    assert [key for key, _ in released] == list(range(8))
    for key, values in released:
        assert values == {"loss": key / 4, "flag": float(key % 2 == 1)}
        assert all(type(value) is float for value in values.values())
    assert len(queue) == 0 and queue.take(everything=True) == []


def test_values_are_those_at_put_time_even_if_the_tensors_change_later():
    queue = DeferredScalars(1)
    loss = torch.tensor(1.0)
    queue.put("a", {"loss": loss})
    loss.add_(5)  # an in-place update after the put (an optimizer step) must not change what was queued
    queue.put("b", {"loss": loss})
    assert queue.take() == [("a", {"loss": 1.0})]


def test_clear_drops_pending_entries_and_a_negative_lag_is_refused():
    queue = DeferredScalars(3)
    queue.put(0, {"x": torch.tensor(1.0)})
    queue.clear()
    assert len(queue) == 0 and queue.take(everything=True) == []
    with pytest.raises(ValueError, match="lag"):
        DeferredScalars(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_values_arrive_through_pinned_memory_without_waiting_for_newer_work():
    queue = DeferredScalars(1)
    first = torch.full((), 3.0, device="cuda")
    queue.put(0, {"x": first})
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):  # keep the GPU busy well after the first copy was queued
        big = big @ big / 64
    queue.put(1, {"x": big[0, 0]})
    assert queue._pending[0].values.is_pinned()
    assert queue.take() == [(0, {"x": 3.0})]
    assert not torch.cuda.current_stream().query()  # the newer work was not waited for
    ((key, values),) = queue.take(everything=True)
    assert key == 1 and values["x"] == pytest.approx(float(big[0, 0].cpu()))
