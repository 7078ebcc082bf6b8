"""Config helpers: safe image-size parsing, OmegaConf resolvers, and one error for every config problem."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable

from omegaconf import OmegaConf

from utils.errors import ImageSizeError, InputError

__all__ = ["ConfigError", "ImageSizeError", "parse_img_size", "register_resolvers"]


class ConfigError(InputError):
    """The composed config is invalid; the message lists every problem found."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("Invalid configuration:\n  - " + "\n  - ".join(self.problems))


def parse_img_size(text: str | int | Iterable[int]) -> list[int]:
    """Parse `img_size_str` ("(384, 128)", "384,128", "256" or a sequence) into [height, width].

    Only integer literals are accepted (`ast.literal_eval`, never `eval`).

    Raises:
        ImageSizeError: for anything but one or two positive integers.
    """
    if isinstance(text, int):
        value = (text, text)
    elif isinstance(text, str):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, TypeError, SyntaxError) as error:
            raise ImageSizeError(
                f"img_size_str={text!r} is not a literal like '(384,128)'; write (height, width) as two integers."
            ) from error
        if isinstance(value, int):
            value = (value, value)
    else:
        try:
            value = tuple(text)
        except TypeError:  # a float or another scalar: reported below
            value = text
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ImageSizeError(f"img_size_str={text!r} must be two positive integers (height, width), e.g. '(384,128)'.")
    return [int(value[0]), int(value[1])]


#: DataLoader workers that feed the fastest measured training rate of the Circle-Loss recipe: 312 samples/s (LoRA
#: on an H200, bench/results/train_throughput_cuda_40steps.md) over 46.8 to 50.0 samples/s per worker for its four
#: views (bench/results/data_throughput_cpu.md, data_throughput_gpu_host.md) is 6.2 to 6.7, so 7, plus one for the
#: evaluation loaders' heavier first batches. Measured: 8 workers gave 768 samples/s on the H200's host.
WORKERS_TO_FEED_THE_GPU = 8


def default_num_workers() -> int:
    """`dataset.num_workers` when unset: enough to feed the GPU, leaving one core to the training process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores - 1, WORKERS_TO_FEED_THE_GPU))


def register_resolvers() -> None:
    """Register `${img_size:...}` (safe size parsing) and `${default_num_workers:}`. Idempotent."""
    if not OmegaConf.has_resolver("img_size"):
        OmegaConf.register_new_resolver("img_size", parse_img_size)
    if not OmegaConf.has_resolver("default_num_workers"):
        # Looked up at each resolution (not bound once), so a test can fix the machine-dependent value.
        OmegaConf.register_new_resolver("default_num_workers", lambda: default_num_workers())
