"""Check the image files a dataset refers to before training: fail on the first bad one, or drop and count them.

`dataset.bad_images` picks the policy:

- ``fail`` (default): every referenced file must exist. Only a ``stat`` per file (CUHK-PEDES's 40k images take well
  under a second); files that exist but cannot be decoded still fail fast, with their path, when a loader first
  reads them (``data.datasets.load_rgb``).
- ``skip``: every referenced file is opened, verified and decoded with PIL; training pairs, gallery images and
  queries whose image is missing or undecodable are dropped, and the count is logged. A query whose person then has
  no gallery image left is dropped too: recall and mAP are undefined for it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from data.datasets import BAD_IMAGE_FIX, ImageNotFoundError, ImageReadError
from data.readers import DatasetSplits, EvalSplit, TrainSample
from utils.config import ConfigError

log = logging.getLogger(__name__)

#: Values of `dataset.bad_images`.
BAD_IMAGE_POLICIES = ("fail", "skip")
#: Paths quoted in the warning of the skip policy.
SHOWN_PATHS = 5


def bad_images_problems(policy: str) -> list[str]:
    """Config-time check of `dataset.bad_images`; empty when valid."""
    if policy in BAD_IMAGE_POLICIES:
        return []
    return [f"dataset.bad_images={policy!r} is unknown; valid: {list(BAD_IMAGE_POLICIES)}."]


def referenced_paths(splits: DatasetSplits) -> list[Path]:
    """Every distinct image path of the train, validation and test splits, in first-seen order."""
    paths = [s.image_path for s in splits.train]
    for split in (splits.val, splits.test):
        if split is not None:
            paths += split.image_paths
    return list(dict.fromkeys(paths))


def is_readable(path: Path) -> bool:
    """Whether PIL can open, verify and fully decode `path` (verify alone passes a truncated JPEG)."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception:  # noqa: BLE001 - PIL signals a bad file with OSError, SyntaxError, ValueError, ...
        return False
    return True


def check_images(splits: DatasetSplits, policy: str = "fail", *, workers: int = 8) -> tuple[DatasetSplits, int]:
    """Apply the `dataset.bad_images` policy to the image files of `splits`.

    Args:
        splits: Reader output (after any subset or hold-out: only the images that will be read are checked).
        policy: ``fail`` or ``skip`` (see the module docstring).
        workers: Threads that open files in parallel under ``skip`` (PIL releases the GIL while reading).

    Returns:
        The splits (unchanged under ``fail``; without the bad images under ``skip``, training pids remapped to stay
        contiguous) and the number of distinct image files dropped.

    Raises:
        ConfigError: `policy` is unknown.
        ImageNotFoundError: under ``fail``, a referenced image does not exist (names the first and the count).
        ImageReadError: under ``skip``, a split is left with no image at all.
    """
    if problems := bad_images_problems(policy):
        raise ConfigError(problems)
    paths = referenced_paths(splits)
    if policy == "fail":
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise ImageNotFoundError(
                f"image {missing[0]} not found ({len(missing)} of the {len(paths)} images {splits.name} refers to "
                f"under {splits.root} are missing); {BAD_IMAGE_FIX}"
            )
        return splits, 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bad = {path for path, ok in zip(paths, pool.map(is_readable, paths)) if not ok}
    if not bad:
        return splits, 0
    where = f"{splits.name} under {splits.root}"
    train = _drop_train(splits.train, bad, where)
    val, val_counts = _drop_eval(splits.val, bad, f"validation split of {where}")
    test, test_counts = _drop_eval(splits.test, bad, f"test split of {where}")
    log.warning(
        "dataset.bad_images=skip: dropped %d missing or unreadable images of %s (%d training captions, %d gallery "
        "images, %d queries whose person has no gallery image left); first: %s",
        len(bad),
        where,
        len(splits.train) - len(train),
        val_counts[0] + test_counts[0],
        val_counts[1] + test_counts[1],
        sorted(str(path) for path in bad)[:SHOWN_PATHS],
    )
    return dataclasses.replace(splits, train=train, val=val, test=test), len(bad)


def _drop_train(samples: list[TrainSample], bad: set[Path], where: str) -> list[TrainSample]:
    """Training pairs without the bad images; pids remapped to 0..N-1 (the ID classifier needs them contiguous)."""
    kept = [s for s in samples if s.image_path not in bad]
    if samples and not kept:
        raise ImageReadError(f"every training image of {where} is missing or unreadable; {BAD_IMAGE_FIX}")
    new_pid = {pid: new for new, pid in enumerate(sorted({s.pid for s in kept}))}
    return [dataclasses.replace(s, pid=new_pid[s.pid]) for s in kept]


def _drop_eval(split: EvalSplit | None, bad: set[Path], where: str) -> tuple[EvalSplit | None, tuple[int, int]]:
    """The split without the bad gallery images and without the queries left with no gallery image of their person.

    Returns the new split and (gallery images dropped, queries dropped).
    """
    if split is None:
        return None, (0, 0)
    gallery = [(pid, path) for pid, path in zip(split.image_pids, split.image_paths) if path not in bad]
    gallery_pids = {pid for pid, _ in gallery}
    queries = [(pid, text) for pid, text in zip(split.caption_pids, split.captions) if pid in gallery_pids]
    if not queries:
        raise ImageReadError(f"no gallery image of a queried person is readable in the {where}; {BAD_IMAGE_FIX}")
    new = EvalSplit(
        image_pids=[pid for pid, _ in gallery],
        image_paths=[path for _, path in gallery],
        caption_pids=[pid for pid, _ in queries],
        captions=[text for _, text in queries],
    )
    return new, (len(split.image_paths) - len(gallery), len(split.captions) - len(queries))
