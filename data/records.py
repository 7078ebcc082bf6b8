"""One annotation record: the JSON file's list, and each record's id, image path, split and captions, validated.

What the peers' readers tolerate is read here too: an ``id`` written as a numeric string or a float with an integer
value is the number it spells, split values are read without surrounding spaces and case (``"Train"``, ``"test "``),
and ``val``, ``validate``, ``validation`` and ``valid`` all name the validation split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import InputError

#: Split values read as the validation split.
VALIDATION_SPLITS = ("val", "validate", "validation", "valid")


class DatasetFormatError(InputError):
    """An annotation file does not match the expected layout."""


@dataclass(frozen=True)
class Record:
    """A validated image record."""

    raw_id: int
    image_path: Path
    captions: list[str]


def load_json_list(annotation: Path) -> list[Any]:
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


def split_name(value: str) -> str:
    """The split a ``split`` value names: spaces and case are the writer's ("Train", "test "), and every validation
    spelling the peers use is ``val``.
    """
    split = value.strip().lower()
    return "val" if split in VALIDATION_SPLITS else split


def parse_record(
    raw: Any,
    index: int,
    annotation: Path,
    keys: tuple[str, tuple[str, ...]],
    image_dir: Path,
    dropped: list[str] | None,
) -> tuple[str, Record]:
    """Validates one raw record and returns its split (``train``, ``val``, ``test`` or another value) and the record.

    With ``dropped`` (the skip policy) malformed captions are left out and described there. A record with no usable
    caption raises DatasetFormatError like any malformed record (the caller drops it under the skip policy), except a
    validation or test record under the skip policy: its image is still a gallery image, one that no query searches.
    """
    path_key, caption_keys = keys  # the image path's key and the caption lists' keys
    where = f"{annotation}: record {index}"
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    raw_id = _person_id(raw, where)
    where = f"{where} (id={raw_id})"
    path = _field(raw, path_key, str, where)
    if not path.strip():
        raise DatasetFormatError(f"{where}: key '{path_key}' must be a non-empty image path under imgs/")
    split = split_name(_field(raw, "split", str, where))
    captions = [caption for key in caption_keys for caption in _captions(raw, key, where, dropped)]
    if not captions and (dropped is None or split == "train"):
        raise DatasetFormatError(f"{where}: no non-empty caption under {list(caption_keys)}")
    return split, Record(raw_id, image_dir / path, captions)
