"""What makes an annotation file unusable as a whole, whatever `dataset.bad_records` says, and what the readers report.

A file is refused when it breaks the evaluation protocol: a person id in two splits (the standard datasets are
identity-disjoint and test persons are unseen in training) or an image listed twice in one evaluation split (every
real annotation file lists each image once; a repeated gallery image counts twice in recall and mAP).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

from data.records import VALIDATION_SPLITS, DatasetFormatError, Record

log = logging.getLogger(__name__)

#: The splits a dataset is read into, in file-protocol order.
SPLITS = ("train", "val", "test")
#: How many dropped records or captions the skip policy quotes in its warning.
SHOWN_PROBLEMS = 5
#: How many shared ids, repeated images or folder entries an error message quotes.
SHOWN_ITEMS = 5


def require_caption_keys(
    name: str, caption_keys: tuple[str, ...], annotation: Path, raw_records: list[Any], variants: Mapping[str, Any]
) -> None:
    """A caption key that no record has is the wrong dataset variant (VN3K without ``en_captions`` read as VN3K_EN)
    or a renamed key, not malformed records: skipping them would drop every record, so the fix is named instead.

    `variants`: the other readers of the same annotation file -> their caption keys.
    """
    records = [raw for raw in raw_records if isinstance(raw, dict)]
    absent = [key for key in caption_keys if records and not any(key in record for record in records)]
    if not absent:
        return
    present = {key for record in records for key in record}
    fitting = [other for other, keys in variants.items() if set(keys) <= present]
    if fitting:
        fix = "; ".join(f"use dataset={_config_name(v)} (captions under {list(variants[v])})" for v in fitting)
    else:
        fix = f"name each record's caption list '{absent[0]}' (the records' keys: {sorted(present)})"
    raise DatasetFormatError(f"{annotation}: no record has key '{absent[0]}', where {name} reads its captions; {fix}")


def _config_name(name: str) -> str:
    """The ``config/dataset`` file that selects the reader ``name`` (``VN3K_VI`` -> ``vn3k_vi``)."""
    return name.lower().replace("-", "_")


def warn_skipped(
    annotation: Path, by_split: dict[str, list[Record]], dropped_records: list[str], dropped_captions: list[str]
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


def warn_other_splits(annotation: Path, by_split: dict[str, list[Record]]) -> None:
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


def require_splits(
    name: str, annotation: Path, by_split: dict[str, list[Record]], raw_records: list[Any], require_train: bool
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


def require_captioned_persons(annotation: Path, split: str, records: list[Record]) -> None:
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


def require_disjoint_identities(annotation: Path, by_split: dict[str, list[Record]]) -> None:
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


def require_unique_images(annotation: Path, path_key: str, split: str, records: list[Record]) -> None:
    """Every real annotation file lists each image once; a repeated gallery image would count twice in recall and
    mAP, so a repeat means a broken file, not a tolerable quirk.
    """
    counts = Counter(record.image_path for record in records)
    repeated = [str(path) for path, count in counts.items() if count > 1]
    if repeated:
        raise DatasetFormatError(
            f"{annotation}: the {split} split lists {len(repeated)} images more than once under key "
            f"'{path_key}' (first: {repeated[:SHOWN_ITEMS]}); a gallery lists each image once: remove the "
            "repeated records"
        )
