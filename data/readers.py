"""Annotation readers for the TBPS datasets (CUHK-PEDES, ICFG-PEDES, RSTPReid, VN3K).

Every dataset is one JSON list of image records under ``<root>/<folder>/<annotation>`` with images under
``<root>/<folder>/imgs/``. Readers validate the records, split them into train / validation / test and return
plain dataclasses; they never open images, so reading the 40k-image CUHK-PEDES annotation takes well under a second.

What the peers' readers tolerate is read here too: an ``id`` written as a numeric string or a float with an integer
value is the number it spells, split values are read without surrounding spaces and case (``"Train"``, ``"test "``),
and ``val``, ``validate``, ``validation`` and ``valid`` all name the validation split. Records that are still malformed
(a blank or ``null`` caption, an id that is not a number, no image path) follow ``dataset.bad_records``: ``fail`` names
the file, record and field; ``skip`` drops the caption (or the training record, when nothing usable is left; a
validation or test image stays in the gallery without a query), counts them and logs the first few.

Whatever the policy, a file is refused when it breaks the evaluation protocol: a person id in two splits (the
standard datasets are identity-disjoint and test persons are unseen in training) or an image listed twice in one
evaluation split (every real annotation file lists each image once; a repeated gallery image counts twice in recall
and mAP).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import combinations
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
#: The splits a dataset is read into, in file-protocol order.
SPLITS = ("train", "val", "test")
#: How many dropped records or captions the skip policy quotes in its warning.
SHOWN_PROBLEMS = 5
#: How many shared ids, repeated images or folder entries an error message quotes.
SHOWN_ITEMS = 5
#: The end of every malformed-record message under the fail policy.
BAD_RECORD_FIX = "fix it, or set dataset.bad_records=skip to drop malformed captions and records and count them"


class DatasetFormatError(InputError):
    """An annotation file does not match the expected layout."""


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
    """Returns the non-blank captions under ``key``; a blank or non-string one, or a missing or non-list ``key``,
    raises, or with ``dropped`` (the skip policy) is left out and described there.

    Captions are kept as written; NFC and whitespace normalisation happen at tokenisation (``data.text``).
    """
    try:
        captions = _field(record, key, list, where)
    except DatasetFormatError as error:
        if dropped is None:
            raise
        dropped.append(str(error))
        return []
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


def _split_name(value: str) -> str:
    """The split a ``split`` value names: spaces and case are the writer's ("Train", "test "), and every validation
    spelling the peers use is ``val``.
    """
    split = value.strip().lower()
    return "val" if split in VALIDATION_SPLITS else split


def _parse(
    raw: Any, index: int, annotation: Path, layout: _Layout, image_dir: Path, dropped: list[str] | None
) -> tuple[str, _Record]:
    """Validates one raw record and returns its split (``train``, ``val``, ``test`` or another value) and the record.

    With ``dropped`` (the skip policy) malformed captions are left out and described there. A record with no usable
    caption raises DatasetFormatError like any malformed record (the caller drops it under the skip policy), except a
    validation or test record under the skip policy: its image is still a gallery image, one that no query searches.
    """
    where = f"{annotation}: record {index}"
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    raw_id = _person_id(raw, where)
    where = f"{where} (id={raw_id})"
    path = _field(raw, layout.path_key, str, where)
    if not path.strip():
        raise DatasetFormatError(f"{where}: key '{layout.path_key}' must be a non-empty image path under imgs/")
    split = _split_name(_field(raw, "split", str, where))
    captions = [caption for key in layout.caption_keys for caption in _captions(raw, key, where, dropped)]
    if not captions and (dropped is None or split == "train"):
        raise DatasetFormatError(f"{where}: no non-empty caption under {list(layout.caption_keys)}")
    return split, _Record(raw_id, image_dir / path, captions)


def _require_caption_keys(name: str, layout: _Layout, annotation: Path, raw_records: list[Any]) -> None:
    """A caption key that no record has is the wrong dataset variant (VN3K without ``en_captions`` read as VN3K_EN)
    or a renamed key, not malformed records: skipping them would drop every record, so the fix is named instead.
    """
    records = [raw for raw in raw_records if isinstance(raw, dict)]
    absent = [key for key in layout.caption_keys if records and not any(key in record for record in records)]
    if not absent:
        return
    present = {key for record in records for key in record}
    variants = [
        other
        for other, candidate in _LAYOUTS.items()
        if other != name
        and candidate.folder == layout.folder
        and candidate.annotation == layout.annotation
        and set(candidate.caption_keys) <= present
    ]
    if variants:
        fix = "; ".join(
            f"use dataset={_config_name(v)} (captions under {list(_LAYOUTS[v].caption_keys)})" for v in variants
        )
    else:
        fix = f"name each record's caption list '{absent[0]}' (the records' keys: {sorted(present)})"
    raise DatasetFormatError(f"{annotation}: no record has key '{absent[0]}', where {name} reads its captions; {fix}")


def _config_name(name: str) -> str:
    """The ``config/dataset`` file that selects the reader ``name`` (``VN3K_VI`` -> ``vn3k_vi``)."""
    return name.lower().replace("-", "_")


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


def _group(
    raw_records: list[Any], annotation: Path, layout: _Layout, image_dir: Path, bad_records: str
) -> tuple[dict[str, list[_Record]], list[str], list[str]]:
    """Parses every record into ``{split: records}``; returns it with the dropped records' and captions' problems
    (both empty under the fail policy, which raises at the first one instead).
    """
    by_split: dict[str, list[_Record]] = {}
    dropped_captions: list[str] | None = [] if bad_records == "skip" else None
    dropped_records: list[str] = []
    for index, raw in enumerate(raw_records):
        try:
            split, record = _parse(raw, index, annotation, layout, image_dir, dropped_captions)
        except DatasetFormatError as error:
            if bad_records != "skip":
                raise DatasetFormatError(f"{error}; {BAD_RECORD_FIX}") from None
            dropped_records.append(str(error))
            continue
        by_split.setdefault(split, []).append(record)
    return by_split, dropped_records, dropped_captions or []


def _warn_skipped(
    annotation: Path, by_split: dict[str, list[_Record]], dropped_records: list[str], dropped_captions: list[str]
) -> None:
    """Logs what the skip policy dropped, and the evaluation images it kept without a query."""
    if not (dropped_records or dropped_captions):
        return
    silent = sum(not record.captions for split in ("val", "test") for record in by_split.get(split, []))
    log.warning(
        "%s: dataset.bad_records=skip dropped %d records and %d captions (%d validation/test images stay in the "
        "gallery without a query); first: %s",
        annotation,
        len(dropped_records),
        len(dropped_captions),
        silent,
        " | ".join((dropped_records + dropped_captions)[:SHOWN_PROBLEMS]),
    )


def _warn_other_splits(annotation: Path, by_split: dict[str, list[_Record]]) -> None:
    """Records of a split value that names none of train, val and test are counted, not silently lost."""
    ignored = Counter({split: len(recs) for split, recs in by_split.items() if split not in SPLITS})
    if ignored:
        log.warning(
            "%s: %d records have split values other than train, test or %s and are not used: %s",
            annotation,
            ignored.total(),
            "/".join(VALIDATION_SPLITS),
            dict(ignored),
        )


def _require_splits(
    name: str, annotation: Path, by_split: dict[str, list[_Record]], raw_records: list[Any], require_train: bool
) -> None:
    """Train (unless ``require_train=False``) and test must have records."""
    for required in ("train", "test") if require_train else ("test",):
        if not by_split.get(required):
            found = Counter(
                raw["split"] for raw in raw_records if isinstance(raw, dict) and isinstance(raw.get("split"), str)
            )
            raise DatasetFormatError(
                f"{annotation}: no usable record has key 'split' == '{required}' (spaces and case ignored; the "
                f"file's split values: {dict(found.most_common(SHOWN_ITEMS))}); {name} needs train and test records: "
                "set each record's 'split' to train, val or test"
            )


def _require_captioned_persons(annotation: Path, split: str, records: list[_Record]) -> None:
    """Under the skip policy a gallery image may have no usable caption, but its person needs one somewhere in the
    split: image-to-text retrieval ranks every gallery image against the captions, and without a relevant caption
    its AP is undefined (the evaluation would stop after training instead of now).
    """
    captioned = {record.raw_id for record in records if record.captions}
    silent = sorted({record.raw_id for record in records} - captioned)
    if silent:
        raise DatasetFormatError(
            f"{annotation}: the {split} persons (key 'id') {silent[:SHOWN_ITEMS]} ({len(silent)} in all) have no "
            "usable caption left under dataset.bad_records=skip, and image-to-text evaluation needs one per gallery "
            "person: fix the captions of their records"
        )


def _require_disjoint_identities(annotation: Path, by_split: dict[str, list[_Record]]) -> None:
    """The protocol tests on persons never trained on nor selected with: the standard datasets are identity-disjoint
    (CUHK-PEDES 11,003 / 1,000 / 1,000 ids, RSTPReid 3,701 / 200 / 200), so an id in two splits is a broken file.
    """
    ids = {split: {record.raw_id for record in by_split[split]} for split in SPLITS if split in by_split}
    shared = [(a, b, sorted(ids[a] & ids[b])) for a, b in combinations(ids, 2) if ids[a] & ids[b]]
    if shared:
        pairs = "; ".join(
            f"{a} and {b} share {len(common)} ids, first {common[:SHOWN_ITEMS]}" for a, b, common in shared
        )
        raise DatasetFormatError(
            f"{annotation}: key 'id' gives a person more than one split ({pairs}); the splits must be "
            "identity-disjoint: the file must give each person one split"
        )


def _require_unique_images(annotation: Path, layout: _Layout, split: str, records: list[_Record]) -> None:
    """Every real annotation file lists each image once; a repeated gallery image would count twice in recall and
    mAP, so a repeat means a broken file, not a tolerable quirk.
    """
    counts = Counter(record.image_path for record in records)
    repeated = [str(path) for path, count in counts.items() if count > 1]
    if repeated:
        raise DatasetFormatError(
            f"{annotation}: the {split} split lists {len(repeated)} images more than once under key "
            f"'{layout.path_key}' (first: {repeated[:SHOWN_ITEMS]}); a gallery lists each image once: remove the "
            "repeated records"
        )


def _read(
    name: str, layout: _Layout, root: str | Path, *, require_train: bool = True, bad_records: str = "fail"
) -> DatasetSplits:
    """Reads one dataset laid out as ``layout`` under ``root``; ``require_train=False`` allows a test-only file."""
    if problems := bad_records_problems(bad_records):
        raise DatasetFormatError(problems[0])
    folder, annotation = _locate(name, layout, Path(root))
    raw_records = _load_json_list(annotation)
    _require_caption_keys(name, layout, annotation, raw_records)
    by_split, dropped_records, dropped_captions = _group(
        raw_records, annotation, layout, folder / IMAGE_DIR, bad_records
    )
    _warn_skipped(annotation, by_split, dropped_records, dropped_captions)
    _warn_other_splits(annotation, by_split)
    _require_splits(name, annotation, by_split, raw_records, require_train)
    _require_disjoint_identities(annotation, by_split)
    for split in ("val", "test"):
        _require_unique_images(annotation, layout, split, by_split.get(split, []))
        _require_captioned_persons(annotation, split, by_split.get(split, []))
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
