"""Annotation readers for the TBPS datasets (CUHK-PEDES, ICFG-PEDES, RSTPReid, VN3K).

Every dataset is one JSON list of image records under ``<root>/<folder>/<annotation>`` with images under
``<root>/<folder>/imgs/``. Readers validate the records, split them into train / validation / test and return
plain dataclasses; they never open images, so reading the 40k-image CUHK-PEDES annotation takes well under a second.

Records are parsed by ``data.records``; malformed ones follow ``dataset.bad_records``: ``fail`` names the file,
record and field; ``skip`` drops the caption (or the training record, when nothing usable is left; a validation or
test image stays in the gallery without a query), counts them and logs the first few. ``data.file_checks`` refuses a
file that breaks the evaluation protocol whatever the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from prettytable import PrettyTable

from data.file_checks import (
    SHOWN_ITEMS,
    require_caption_keys,
    require_captioned_persons,
    require_disjoint_identities,
    require_splits,
    require_unique_images,
    warn_other_splits,
    warn_skipped,
)
from data.records import DatasetFormatError, Record, load_json_list, parse_record
from utils.errors import InputError

log = logging.getLogger(__name__)

IMAGE_DIR = "imgs"
#: Values of `dataset.bad_records`.
BAD_RECORD_POLICIES = ("fail", "skip")
#: The end of every malformed-record message under the fail policy.
BAD_RECORD_FIX = "fix it, or set dataset.bad_records=skip to drop malformed captions and records and count them"


class DatasetNotFoundError(InputError, FileNotFoundError):
    """The dataset folder, its ``imgs/`` folder or its annotation file does not exist."""


class DatasetLayoutError(DatasetNotFoundError):
    """The dataset folder exists but its ``imgs/`` folder or annotation file does not: a misnamed or misplaced part,
    which ``data.check`` reports as malformed rather than as a dataset that is simply not installed.
    """


class UnknownDatasetError(InputError):
    """A dataset name that is not a key of ``READERS``."""


@dataclass(frozen=True)
class TrainSample:
    """One training pair: an image and one of its captions.

    Attributes:
        pid: Contiguous person id in ``0..num_train_ids-1`` (raw ids remapped in sorted order).
        image_id: Index of the image record within the train split.
        image_path: Path of the image file under ``imgs/``.
        caption: Caption text as written in the annotation file.
    """

    pid: int
    image_id: int
    image_path: Path
    caption: str


@dataclass(frozen=True)
class EvalSplit:
    """A retrieval split: a gallery of images and the caption queries that search it.

    Pids are the raw dataset ids; only equality between query and gallery pids matters.

    Attributes:
        image_pids: Person id of each gallery image.
        image_paths: Path of each gallery image.
        caption_pids: Person id of each query caption.
        captions: Query caption texts.
    """

    image_pids: list[int]
    image_paths: list[Path]
    caption_pids: list[int]
    captions: list[str]

    def __post_init__(self) -> None:
        if len(self.image_pids) != len(self.image_paths) or len(self.caption_pids) != len(self.captions):
            raise ValueError(
                f"EvalSplit lists must be parallel: {len(self.image_pids)} image pids vs {len(self.image_paths)} "
                f"paths, {len(self.caption_pids)} caption pids vs {len(self.captions)} captions"
            )
        # A query without any relevant gallery image has undefined recall/mAP.
        orphans = sorted(set(self.caption_pids) - set(self.image_pids))
        if orphans:
            raise DatasetFormatError(
                f"query pids {orphans[:10]} ({len(orphans)} in all) have no gallery image; every query needs at "
                "least one image of the same person in the gallery: add one, or remove those captions"
            )


@dataclass(frozen=True)
class DatasetSplits:
    """All splits of one dataset.

    Attributes:
        name: Registry name of the dataset (a key of ``READERS``).
        root: The dataset folder that holds the annotation file and ``imgs/``.
        train: Training pairs, one per caption.
        val: Validation split, or None when the annotation file has none.
        test: Test split.
        skipped_records: Malformed records dropped under ``dataset.bad_records=skip``.
        skipped_captions: Malformed captions dropped under ``dataset.bad_records=skip``.
    """

    name: str
    root: Path
    train: list[TrainSample]
    val: EvalSplit | None
    test: EvalSplit
    skipped_records: int = 0
    skipped_captions: int = 0

    @property
    def num_train_ids(self) -> int:
        """Number of distinct training identities (the size of an ID classifier)."""
        return len({sample.pid for sample in self.train})

    def summary_rows(self) -> list[tuple[str, int, int, int]]:
        """Returns ``(subset, #ids, #images, #captions)`` for train, val (when present) and test."""
        rows = [
            ("train", self.num_train_ids, len({s.image_id for s in self.train}), len(self.train)),
        ]
        for subset, split in (("val", self.val), ("test", self.test)):
            if split is not None:
                rows.append((subset, len(set(split.image_pids)), len(split.image_paths), len(split.captions)))
        return rows


def bad_records_problems(policy: str) -> list[str]:
    """Config-time check of `dataset.bad_records`; empty when valid."""
    if policy in BAD_RECORD_POLICIES:
        return []
    return [f"dataset.bad_records={policy!r} is unknown; valid: {list(BAD_RECORD_POLICIES)}."]


@dataclass(frozen=True)
class _Layout:
    """Where a dataset lives on disk and which keys its records use."""

    folder: str
    annotation: str
    path_key: str
    caption_keys: tuple[str, ...]


_LAYOUTS: dict[str, _Layout] = {
    "CUHK-PEDES": _Layout("CUHK-PEDES", "reid_raw.json", "file_path", ("captions",)),
    "ICFG-PEDES": _Layout("ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("captions",)),
    "RSTPReid": _Layout("RSTPReid", "data_captions.json", "img_path", ("captions",)),
    "VN3K_VI": _Layout("VN3K", "data_captions.json", "file_path", ("captions",)),
    "VN3K_EN": _Layout("VN3K", "data_captions.json", "file_path", ("en_captions",)),
    "VN3K_MIXED": _Layout("VN3K", "data_captions.json", "file_path", ("en_captions", "captions")),
}


def _locate(name: str, layout: _Layout, root: Path) -> tuple[Path, Path]:
    """Returns the dataset folder and annotation file, raising if anything is missing."""
    folder = root / layout.folder
    annotation = folder / layout.annotation
    if not folder.is_dir():
        raise DatasetNotFoundError(_folder_not_found(name, layout, root))
    if not (folder / IMAGE_DIR).is_dir():
        raise DatasetLayoutError(
            f"image folder {folder / IMAGE_DIR} not found ({folder} holds {_entries(folder)}): put the {name} images "
            "there"
        )
    if not annotation.is_file():
        raise DatasetLayoutError(
            f"annotation file {annotation} not found ({folder} holds {_entries(folder)}): put the {name} "
            f"{layout.annotation} there"
        )
    return folder, annotation


def _folder_not_found(name: str, layout: _Layout, root: Path) -> str:
    """The message for an absent dataset folder; a root that is a dataset folder itself gets its parent as fix."""
    folder = root / layout.folder
    expected = f"the {name} annotation file {layout.annotation} and the images under {IMAGE_DIR}/"
    if root.name in {other.folder for other in _LAYOUTS.values()}:
        return (
            f"dataset folder {folder} not found: dataset_root_dir={root} is the {root.name} dataset folder itself; "
            f"set dataset_root_dir={root.parent}, the folder that holds the dataset folders ({layout.folder}/, ...)"
        )
    return (
        f"dataset folder {folder} not found: put {expected} there, or point the dataset root (dataset_root_dir=) at "
        f"the folder that contains {layout.folder}/"
    )


def _entries(folder: Path) -> str:
    """The first few names in ``folder`` (folders with a trailing ``/``), so a misnamed part is visible at once."""
    names = sorted(entry.name + "/" * entry.is_dir() for entry in folder.iterdir())
    more = f" and {len(names) - SHOWN_ITEMS} more" if len(names) > SHOWN_ITEMS else ""
    return f"{names[:SHOWN_ITEMS]}{more}" if names else "nothing"


def _train_samples(records: list[Record]) -> list[TrainSample]:
    """Flattens train records to one sample per caption, remapping ids to contiguous pids."""
    pid_of = {raw_id: pid for pid, raw_id in enumerate(sorted({r.raw_id for r in records}))}
    return [
        TrainSample(pid_of[record.raw_id], image_id, record.image_path, caption)
        for image_id, record in enumerate(records)
        for caption in record.captions
    ]


def _eval_split(records: list[Record]) -> EvalSplit:
    """Builds a gallery (one entry per record) and its queries (one per caption)."""
    return EvalSplit(
        image_pids=[r.raw_id for r in records],
        image_paths=[r.image_path for r in records],
        caption_pids=[r.raw_id for r in records for _ in r.captions],
        captions=[caption for r in records for caption in r.captions],
    )


def _same_file_variants(name: str, layout: _Layout) -> dict[str, tuple[str, ...]]:
    """The other readers of the same annotation file (VN3K_EN for VN3K_VI) -> their caption keys."""
    return {
        other: candidate.caption_keys
        for other, candidate in _LAYOUTS.items()
        if other != name and (candidate.folder, candidate.annotation) == (layout.folder, layout.annotation)
    }


def _group(
    raw_records: list[Any], annotation: Path, layout: _Layout, image_dir: Path, bad_records: str
) -> tuple[dict[str, list[Record]], list[str], list[str]]:
    """Parses every record into ``{split: records}``; returns it with the dropped records' and captions' problems
    (both empty under the fail policy, which raises at the first one instead).
    """
    by_split: dict[str, list[Record]] = {}
    dropped_captions: list[str] | None = [] if bad_records == "skip" else None
    dropped_records: list[str] = []
    for index, raw in enumerate(raw_records):
        try:
            keys = (layout.path_key, layout.caption_keys)
            split, record = parse_record(raw, index, annotation, keys, image_dir, dropped_captions)
        except DatasetFormatError as error:
            if bad_records != "skip":
                raise DatasetFormatError(f"{error}; {BAD_RECORD_FIX}") from None
            dropped_records.append(str(error))
            continue
        by_split.setdefault(split, []).append(record)
    return by_split, dropped_records, dropped_captions or []


def _read(
    name: str, layout: _Layout, root: str | Path, *, require_train: bool = True, bad_records: str = "fail"
) -> DatasetSplits:
    """Reads one dataset laid out as ``layout`` under ``root``; ``require_train=False`` allows a test-only file."""
    if problems := bad_records_problems(bad_records):
        raise DatasetFormatError(problems[0])
    folder, annotation = _locate(name, layout, Path(root))
    raw_records = load_json_list(annotation)
    require_caption_keys(name, layout.caption_keys, annotation, raw_records, _same_file_variants(name, layout))
    by_split, dropped_records, dropped_captions = _group(
        raw_records, annotation, layout, folder / IMAGE_DIR, bad_records
    )
    warn_skipped(annotation, by_split, dropped_records, dropped_captions)
    warn_other_splits(annotation, by_split)
    require_splits(name, annotation, by_split, raw_records, require_train)
    require_disjoint_identities(annotation, by_split)
    for split in ("val", "test"):
        require_unique_images(annotation, layout.path_key, split, by_split.get(split, []))
        require_captioned_persons(annotation, split, by_split.get(split, []))
    val_records = by_split.get("val")
    splits = DatasetSplits(
        name=name,
        root=folder,
        train=_train_samples(by_split.get("train", [])),
        val=_eval_split(val_records) if val_records else None,
        test=_eval_split(by_split["test"]),
        skipped_records=len(dropped_records),
        skipped_captions=len(dropped_captions),
    )
    table = PrettyTable(["subset", "ids", "images", "captions"])
    table.add_rows(splits.summary_rows())
    log.info("%s statistics (%s):\n%s", name, annotation, table)
    return splits


READERS: dict[str, Callable[..., DatasetSplits]] = {
    name: partial(_read, name, layout) for name, layout in _LAYOUTS.items()
}


def read_dataset(
    name: str, root: str | Path, *, require_train: bool = True, bad_records: str = "fail"
) -> DatasetSplits:
    """Reads a dataset by registry name.

    Args:
        name: A key of ``READERS`` (``CUHK-PEDES``, ``ICFG-PEDES``, ``RSTPReid``, ``VN3K_VI``, ``VN3K_EN``,
            ``VN3K_MIXED``).
        root: Folder that contains the dataset folder (for example ``<root>/CUHK-PEDES/reid_raw.json``).
        require_train: False to evaluate on a dataset whose annotation holds only test records.
        bad_records: ``fail`` or ``skip`` malformed captions and records (module docstring).

    Returns:
        The validated train, validation and test splits.

    Raises:
        UnknownDatasetError: ``name`` is not a registered dataset.
        DatasetNotFoundError: The dataset folder, ``imgs/`` or the annotation file is missing.
        DatasetFormatError: The annotation file is malformed.
    """
    if name not in READERS:
        raise UnknownDatasetError(
            f"unknown dataset '{name}'; set dataset.dataset_name to one of the valid names: {sorted(READERS)}"
        )
    return READERS[name](Path(root), require_train=require_train, bad_records=bad_records)
