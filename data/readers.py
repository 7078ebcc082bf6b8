"""Annotation readers for the TBPS datasets (CUHK-PEDES, ICFG-PEDES, RSTPReid, VN3K).

Every dataset is one JSON list of image records under ``<root>/<folder>/<annotation>`` with images under
``<root>/<folder>/imgs/``. Readers validate the records, split them into train / validation / test and return
plain dataclasses; they never open images, so reading the 40k-image CUHK-PEDES annotation takes well under a second.

What the peers' readers tolerate is read here too: an ``id`` written as a numeric string or a float with an integer
value is the number it spells, and ``val``, ``validate``, ``validation`` and ``valid`` all name the validation split.
Records that are still malformed (a blank or ``null`` caption, an id that is not a number, no image path) follow
``dataset.bad_records``: ``fail`` names the file, record and field; ``skip`` drops the caption (or the record, when
nothing usable is left), counts them and logs the first few.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from prettytable import PrettyTable

from utils.errors import InputError

log = logging.getLogger(__name__)

IMAGE_DIR = "imgs"
#: Values of `dataset.bad_records`.
BAD_RECORD_POLICIES = ("fail", "skip")
#: Split values read as the validation split.
VALIDATION_SPLITS = ("val", "validate", "validation", "valid")
#: How many dropped records or captions the skip policy quotes in its warning.
SHOWN_PROBLEMS = 5
#: The end of every malformed-record message under the fail policy.
BAD_RECORD_FIX = "fix it, or set dataset.bad_records=skip to drop malformed captions and records and count them"


class DatasetFormatError(InputError):
    """An annotation file does not match the expected layout."""


class DatasetNotFoundError(InputError, FileNotFoundError):
    """The dataset folder, its ``imgs/`` folder or its annotation file does not exist."""


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


@dataclass(frozen=True)
class _Record:
    """A validated image record."""

    raw_id: int
    image_path: Path
    captions: list[str]


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
    expected = f"the {name} annotation file {layout.annotation} and the images under {IMAGE_DIR}/"
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"dataset folder {folder} not found: put {expected} there, or point the dataset root at the folder "
            f"that contains {layout.folder}/"
        )
    if not (folder / IMAGE_DIR).is_dir():
        raise DatasetNotFoundError(f"image folder {folder / IMAGE_DIR} not found: put the {name} images there")
    if not annotation.is_file():
        raise DatasetNotFoundError(f"annotation file {annotation} not found: put the {name} {layout.annotation} there")
    return folder, annotation


def _load_json_list(annotation: Path) -> list[Any]:
    """Parses the annotation file, which must hold a JSON list."""
    try:
        data = json.loads(annotation.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(
            f"{annotation}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the file there"
        ) from err
    except UnicodeDecodeError as err:
        raise DatasetFormatError(
            f"{annotation}: not UTF-8 text (byte {err.start}: {err.reason}); re-save the file as UTF-8"
        ) from err
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{annotation}: top level must be a JSON list of image records, got {type(data).__name__}; "
            "write the records as [{...}, {...}]"
        )
    return data


def _person_id(record: dict[str, Any], where: str) -> int:
    """The record's ``id``: an int, a numeric string (``"12"``) or an integral float (``12.0``), as peers read it."""
    value = _field(record, "id", object, where)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise DatasetFormatError(f"{where}: key 'id' must be a person id number, got {type(value).__name__} {value!r:.60}")


def _field(record: dict[str, Any], key: str, expected: type, where: str) -> Any:
    """Returns ``record[key]``, raising if it is missing or of the wrong type (bools are not ints)."""
    if key not in record:
        raise DatasetFormatError(f"{where}: missing key '{key}' ({expected.__name__})")
    value = record[key]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise DatasetFormatError(
            f"{where}: key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _captions(record: dict[str, Any], key: str, where: str, dropped: list[str] | None) -> list[str]:
    """Returns the non-blank captions under ``key``; a blank or non-string one raises, or with ``dropped`` (the skip
    policy) is left out and described there.

    Captions are kept as written; NFC and whitespace normalisation happen at tokenisation (``data.text``).
    """
    captions = _field(record, key, list, where)
    kept = []
    for i, caption in enumerate(captions):
        if isinstance(caption, str) and caption.strip():
            kept.append(caption)
            continue
        problem = f"{where}: key '{key}' item {i} must be a non-empty caption, got {caption!r:.60}"
        if dropped is None:
            raise DatasetFormatError(problem)
        dropped.append(problem)
    return kept


def _parse(
    raw: Any, index: int, annotation: Path, layout: _Layout, image_dir: Path, dropped: list[str] | None
) -> tuple[str, _Record]:
    """Validates one raw record and returns its split value with the parsed record.

    With ``dropped`` (the skip policy) malformed captions are left out and described there; a record with nothing
    usable raises DatasetFormatError like any malformed record, which the caller drops under the skip policy.
    """
    where = f"{annotation}: record {index}"
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    raw_id = _person_id(raw, where)
    where = f"{where} (id={raw_id})"
    path = _field(raw, layout.path_key, str, where)
    if not path.strip():
        raise DatasetFormatError(f"{where}: key '{layout.path_key}' must be a non-empty image path under imgs/")
    split = _field(raw, "split", str, where)
    captions = [caption for key in layout.caption_keys for caption in _captions(raw, key, where, dropped)]
    if not captions:
        raise DatasetFormatError(f"{where}: no non-empty caption under {list(layout.caption_keys)}")
    return split, _Record(raw_id, image_dir / path, captions)


def _train_samples(records: list[_Record]) -> list[TrainSample]:
    """Flattens train records to one sample per caption, remapping ids to contiguous pids."""
    pid_of = {raw_id: pid for pid, raw_id in enumerate(sorted({r.raw_id for r in records}))}
    return [
        TrainSample(pid_of[record.raw_id], image_id, record.image_path, caption)
        for image_id, record in enumerate(records)
        for caption in record.captions
    ]


def _eval_split(records: list[_Record]) -> EvalSplit:
    """Builds a gallery (one entry per record) and its queries (one per caption)."""
    return EvalSplit(
        image_pids=[r.raw_id for r in records],
        image_paths=[r.image_path for r in records],
        caption_pids=[r.raw_id for r in records for _ in r.captions],
        captions=[caption for r in records for caption in r.captions],
    )


def _read(
    name: str, layout: _Layout, root: str | Path, *, require_train: bool = True, bad_records: str = "fail"
) -> DatasetSplits:
    """Reads one dataset laid out as ``layout`` under ``root``; ``require_train=False`` allows a test-only file."""
    if problems := bad_records_problems(bad_records):
        raise DatasetFormatError(problems[0])
    folder, annotation = _locate(name, layout, Path(root))
    by_split: dict[str, list[_Record]] = {}
    dropped_captions: list[str] | None = [] if bad_records == "skip" else None
    dropped_records: list[str] = []
    for index, raw in enumerate(_load_json_list(annotation)):
        try:
            split, record = _parse(raw, index, annotation, layout, folder / IMAGE_DIR, dropped_captions)
        except DatasetFormatError as error:
            if bad_records != "skip":
                raise DatasetFormatError(f"{error}; {BAD_RECORD_FIX}") from None
            dropped_records.append(str(error))
            continue
        by_split.setdefault("val" if split in VALIDATION_SPLITS else split, []).append(record)
    if dropped_records or dropped_captions:
        shown = (dropped_records + (dropped_captions or []))[:SHOWN_PROBLEMS]
        log.warning(
            "%s: dataset.bad_records=skip dropped %d records and %d captions; first: %s",
            annotation,
            len(dropped_records),
            len(dropped_captions or []),
            " | ".join(shown),
        )

    known = ("train", "val", "test")
    ignored = Counter({split: len(recs) for split, recs in by_split.items() if split not in known})
    if ignored:
        log.warning(
            "%s: %d records have split values other than train, test or %s and are not used: %s",
            annotation,
            ignored.total(),
            "/".join(VALIDATION_SPLITS),
            dict(ignored),
        )
    for required in ("train", "test") if require_train else ("test",):
        if not by_split.get(required):
            raise DatasetFormatError(
                f"{annotation}: no record has key 'split' == '{required}'; {name} needs train and test records"
            )
    val_records = by_split.get("val")
    splits = DatasetSplits(
        name=name,
        root=folder,
        train=_train_samples(by_split.get("train", [])),
        val=_eval_split(val_records) if val_records else None,
        test=_eval_split(by_split["test"]),
        skipped_records=len(dropped_records),
        skipped_captions=len(dropped_captions or []),
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
