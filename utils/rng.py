"""The random generators' states, for a checkpoint: Python's, NumPy's, torch's CPU and CUDA generators.

Lightning restores weights, optimizer, scheduler and loop counters but not these, which drive shuffling and
augmentation: without them a resumed run would diverge from an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    # Plain lists and tensors only, so the checkpoint loads with torch.load(weights_only=True).
    states = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
