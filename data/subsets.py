"""Training subsets for data-efficiency experiments: one identity fold, and the 10 % CUHK + VN3K mix."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

from data.readers import DatasetSplits, EvalSplit, TrainSample, read_dataset
from utils.errors import InputError

log = logging.getLogger(__name__)


def _remap(samples: list[TrainSample]) -> list[TrainSample]:
    """Contiguous pids 0..N-1 in sorted order of the current ones (the ID classifier needs them)."""
    new_pid = {pid: new for new, pid in enumerate(sorted({s.pid for s in samples}))}
    return [dataclasses.replace(s, pid=new_pid[s.pid]) for s in samples]


def identity_fold(splits: DatasetSplits, proportion: float, fold_id: int, seed: int) -> DatasetSplits:
    """Keep fold `fold_id` of the training identities cut into `int(1 / proportion)` folds.

    Identities are shuffled with `Random(seed)`; fold k holds those from `round(k * N * proportion)` to
    `round((k + 1) * N * proportion)`: N * proportion people (rounded), no person in two folds, and every person in
    one when 1 / proportion is a whole number (0.1: ten folds cover all N).
    """
    num_folds = int(1 / proportion)
    if not 0 < proportion < 1 or not 0 <= fold_id < num_folds:
        raise InputError(
            f"dataset.proportion={proportion} and dataset.fold_id={fold_id}: proportion must be in (0, 1) and "
            f"fold_id in [0, {num_folds - 1}]."
        )
    identities = sorted({s.pid for s in splits.train})
    random.Random(seed).shuffle(identities)
    start, stop = (round(k * len(identities) * proportion) for k in (fold_id, fold_id + 1))
    if start == stop:
        raise InputError(f"dataset.proportion={proportion} leaves no identity of {len(identities)} in a fold.")
    kept = set(identities[start:stop])
    train = _remap([s for s in splits.train if s.pid in kept])
    log.info(
        "Fold %d of %d: %d of %d training identities, %d captions.",
        fold_id,
        num_folds,
        len(kept),
        len(identities),
        len(train),
    )
    return dataclasses.replace(splits, train=train)


#: `dataset.mix_form` values of the CUHK + VN3K mix.
MIX_FORMS = ("identities", "images")


def ten_percent_cuhk_vn3k_mix(
    root: Path, seed: int, *, cuhk_proportion: float = 0.1, bad_records: str = "fail", form: str = "identities"
) -> DatasetSplits:
    """TEN_PERCENT_CUHK_VN3K_MIX: 10 % of CUHK-PEDES training plus all of VN3K_VI training.

    English CUHK captions help the Vietnamese task through the multilingual text tower. VN3K pids follow CUHK's so
    the two sets of people never share an id. Validation is CUHK-PEDES's own split.

    - ``form="identities"`` (default): 10 % of CUHK's training identities, all of each one's images; test on VN3K
      (the target).
    - ``form="images"`` (the original project's, `parity=seed`): 10 % of CUHK's training images drawn with
      ``Random(seed)``, so a person can be partly in; test on CUHK-PEDES test plus VN3K test, VN3K ids shifted past
      CUHK's.
    """
    if form not in MIX_FORMS:
        raise InputError(f"dataset.mix_form={form!r} is unknown; valid: {list(MIX_FORMS)}")
    cuhk = read_dataset("CUHK-PEDES", root, bad_records=bad_records)
    vn3k = read_dataset("VN3K_VI", root, bad_records=bad_records)
    if form == "images":
        image_ids = sorted({s.image_id for s in cuhk.train})
        kept = set(random.Random(seed).sample(image_ids, int(len(image_ids) * cuhk_proportion)))
        cuhk_part = [s for s in cuhk.train if s.image_id in kept]
    else:
        cuhk_part = identity_fold(cuhk, cuhk_proportion, 0, seed).train
    offset = max(s.pid for s in cuhk_part) + 1
    images_offset = max(s.image_id for s in cuhk.train) + 1
    vn3k_part = [dataclasses.replace(s, pid=s.pid + offset, image_id=s.image_id + images_offset) for s in vn3k.train]
    test = vn3k.test
    if form == "images":
        shift = max([*cuhk.test.image_pids, *(cuhk.val.image_pids if cuhk.val else [])]) + 1
        test = EvalSplit(
            image_pids=cuhk.test.image_pids + [pid + shift for pid in vn3k.test.image_pids],
            image_paths=cuhk.test.image_paths + vn3k.test.image_paths,
            caption_pids=cuhk.test.caption_pids + [pid + shift for pid in vn3k.test.caption_pids],
            captions=cuhk.test.captions + vn3k.test.captions,
        )
    log.info("TEN_PERCENT_CUHK_VN3K_MIX (%s form): %d CUHK-PEDES training captions", form, len(cuhk_part))
    return DatasetSplits(
        name="TEN_PERCENT_CUHK_VN3K_MIX",
        root=Path(root),
        train=_remap(cuhk_part + vn3k_part),
        val=cuhk.val,
        test=test,
    )
