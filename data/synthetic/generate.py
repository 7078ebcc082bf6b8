"""Write a synthetic dataset in the on-disk layout of VN3K, atomically and deterministically.

Layout (what the VN3K readers expect)::

    <out_dir>/VN3K/data_captions.json   JSON list of image records
    <out_dir>/VN3K/imgs/<id>/<id>_c<camera>_<k>.png
    <out_dir>/VN3K/synthetic_meta.json  generator spec and per-identity attributes (ignored by readers)

Ids are 1-based and contiguous over the whole file and assigned split by split (train, validate, test), so the train
ids are also contiguous, which the VN3K loaders assert. Every random draw comes from a ``random.Random`` seeded with a
string built from the spec's seed, so the same spec writes byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from data.synthetic.attributes import PersonAttributes, sample_identities
from data.synthetic.captions import make_captions
from data.synthetic.drawing import SKIN_TONES, render_person, sample_view

log = logging.getLogger(__name__)

DATASET_DIR = "VN3K"
ANNOTATION_FILE = "data_captions.json"
IMAGE_DIR = "imgs"
META_FILE = "synthetic_meta.json"
SPLITS = ("train", "validate", "test")
CAMERAS = 3
MIN_IMAGE_SIZE = (32, 16)  # (H, W) below which clothes and accessories are no longer distinguishable


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and seed of a synthetic VN3K dataset.

    Attributes:
        num_identities: Number of people over all splits.
        images_per_identity: Inclusive ``(min, max)`` number of images per person.
        split_fractions: Fractions of identities in ``train``, ``validate`` and ``test``.
        image_size: ``(height, width)`` of every image in pixels.
        seed: Seed of every random draw.
    """

    num_identities: int = 320  # the demo's size (config/dataset/demo.yaml)
    images_per_identity: tuple[int, int] = (2, 4)
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    image_size: tuple[int, int] = (128, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        issues = []
        low, high = self.images_per_identity
        if not 1 <= low <= high:
            issues.append(f"images_per_identity={self.images_per_identity} must satisfy 1 <= min <= max")
        if len(self.split_fractions) != len(SPLITS) or min(self.split_fractions) < 0:
            issues.append(f"split_fractions={self.split_fractions} must be 3 non-negative numbers ({SPLITS})")
        elif not math.isclose(sum(self.split_fractions), 1.0, abs_tol=1e-6):
            issues.append(f"split_fractions={self.split_fractions} must sum to 1, got {sum(self.split_fractions)}")
        else:
            sizes = self.split_sizes()
            if sizes["train"] < 1 or sizes["test"] < 1:
                issues.append(
                    f"num_identities={self.num_identities} with split_fractions={self.split_fractions} gives split "
                    f"sizes {sizes}; train and test need at least one identity each: raise num_identities"
                )
        if any(got < least for got, least in zip(self.image_size, MIN_IMAGE_SIZE)):
            issues.append(f"image_size={self.image_size} (H, W) must be at least {MIN_IMAGE_SIZE}")
        if issues:
            raise ValueError("invalid SyntheticSpec:\n  " + "\n  ".join(issues))

    def split_sizes(self) -> dict[str, int]:
        """Identities per split; rounding leftovers go to ``test``."""
        train = round(self.num_identities * self.split_fractions[0])
        validate = round(self.num_identities * self.split_fractions[1])
        return {"train": train, "validate": validate, "test": self.num_identities - train - validate}


def _draw_identities(spec: SyntheticSpec) -> list[tuple[str, PersonAttributes]]:
    """``(split, attributes)`` per identity, in id order; attributes are distinct within each split."""
    rng = random.Random(f"vn3k-synthetic:{spec.seed}:attributes")
    return [(split, attrs) for split, count in spec.split_sizes().items() for attrs in sample_identities(count, rng)]


def _write_dataset(root: Path, spec: SyntheticSpec) -> int:
    """Writes images, annotation and metadata under ``root``; returns the number of image records."""
    identities = _draw_identities(spec)
    digits = max(4, len(str(len(identities))))
    records = []
    for pid, (split, attrs) in enumerate(identities, start=1):
        rng = random.Random(f"vn3k-synthetic:{spec.seed}:identity:{pid}")
        skin_tone = rng.randrange(len(SKIN_TONES))
        (root / IMAGE_DIR / f"{pid:0{digits}d}").mkdir(parents=True)
        for k in range(1, rng.randint(*spec.images_per_identity) + 1):
            view = sample_view(rng, skin_tone)
            file_path = f"{pid:0{digits}d}/{pid:0{digits}d}_c{rng.randint(1, CAMERAS)}_{k:02d}.png"
            render_person(attrs, view, spec.image_size).save(root / IMAGE_DIR / file_path, format="PNG")
            vietnamese, english = make_captions(attrs, view.background, rng)
            records.append(
                {"id": pid, "file_path": file_path, "captions": vietnamese, "en_captions": english, "split": split}
            )
    meta = {
        "spec": asdict(spec),
        "identities": [
            {"id": pid, "split": split, **asdict(attrs)} for pid, (split, attrs) in enumerate(identities, start=1)
        ],
    }
    (root / ANNOTATION_FILE).write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (root / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return len(records)


def _swap_in(staging: Path, target: Path, overwrite: bool) -> None:
    """Renames ``staging`` to ``target``.

    With ``overwrite``, an existing ``target`` is moved aside and deleted only after the swap. Without it the rename
    fails (OSError) if ``target`` appeared since the caller checked, because it is then a non-empty folder.
    """
    if not (overwrite and target.exists()):
        staging.rename(target)
        return
    aside = staging.with_name(staging.name.replace(".partial-", ".old-"))
    target.rename(aside)
    try:
        staging.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def generate_vn3k(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(), *, overwrite: bool = False) -> Path:
    """Writes a synthetic dataset to ``<out_dir>/VN3K``.

    The dataset is built in a hidden folder next to the target and renamed into place, so an interrupted or failed
    run never leaves a half-written ``VN3K``.

    Args:
        out_dir: Dataset root (the folder that will contain ``VN3K/``); created if missing.
        spec: Size and seed.
        overwrite: Replace an existing ``<out_dir>/VN3K``.

    Returns:
        The ``VN3K`` folder.

    Raises:
        FileExistsError: ``<out_dir>/VN3K`` exists and ``overwrite`` is False.
    """
    target = Path(out_dir) / DATASET_DIR
    refusal = (
        f"{target} already exists: pass overwrite=True (CLI: --overwrite) to replace it, or use "
        "ensure_vn3k() to reuse it"
    )
    if target.exists() and not overwrite:
        raise FileExistsError(refusal)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{DATASET_DIR}.partial-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    start = time.perf_counter()
    try:
        num_images = _write_dataset(staging, spec)
        try:
            _swap_in(staging, target, overwrite)
        except OSError as err:
            if overwrite or not target.exists():
                raise
            raise FileExistsError(refusal) from err  # another process (e.g. a DDP rank) finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "Wrote synthetic VN3K to %s: %d identities %s, %d images, %.1f s",
        target,
        spec.num_identities,
        spec.split_sizes(),
        num_images,
        time.perf_counter() - start,
    )
    return target


def ensure_vn3k(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Returns ``<out_dir>/VN3K``, generating it first if its ``data_captions.json`` is absent.

    An existing dataset is used as it is; a warning says so if it was generated from a different spec.
    """
    target = Path(out_dir) / DATASET_DIR
    if not (target / ANNOTATION_FILE).is_file():
        log.info("%s not found: generating a synthetic VN3K", target / ANNOTATION_FILE)
        try:
            return generate_vn3k(out_dir, spec)
        except FileExistsError:
            if not (target / ANNOTATION_FILE).is_file():
                raise
    log.info("Using the existing dataset at %s", target)
    meta_file = target / META_FILE
    if meta_file.is_file():
        existing = json.loads(meta_file.read_text(encoding="utf-8"))["spec"]
        requested = json.loads(json.dumps(asdict(spec)))  # tuples -> lists, as stored
        if existing != requested:
            log.warning(
                "%s was generated with %s, not the requested %s; using it anyway. Delete it or call "
                "generate_vn3k(..., overwrite=True) to regenerate.",
                target,
                existing,
                requested,
            )
    return target


def all_captions(dataset_dir: str | Path) -> list[str]:
    """Every Vietnamese and English caption of a VN3K-layout dataset, in file order (tokenizer training corpus).

    Args:
        dataset_dir: The ``VN3K`` folder (as returned by ``generate_vn3k``); ``en_captions`` may be absent.
    """
    annotation = Path(dataset_dir) / ANNOTATION_FILE
    if not annotation.is_file():
        raise FileNotFoundError(f"{annotation} not found: pass the VN3K folder returned by generate_vn3k/ensure_vn3k")
    captions = []
    for index, record in enumerate(json.loads(annotation.read_text(encoding="utf-8"))):
        if not isinstance(record.get("captions"), list):
            raise ValueError(f"{annotation}: record {index} has no 'captions' list; fix or regenerate the file")
        captions.extend(record["captions"])
        captions.extend(record.get("en_captions", []))
    return captions
