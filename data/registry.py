"""Every dataset `dataset.dataset_name` can name, with one signature: the readers of single datasets and the mixes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data.readers import READERS, DatasetSplits, read_dataset
from data.subsets import ten_percent_cuhk_vn3k_mix

#: `dataset.dataset_name` -> `(root, *, seed, require_train, bad_records, mix_form) -> DatasetSplits`.
DatasetLoader = Callable[..., DatasetSplits]


def _single(name: str) -> DatasetLoader:
    def load(root: Path, *, seed: int, require_train: bool, bad_records: str, mix_form: str) -> DatasetSplits:
        return read_dataset(name, root, require_train=require_train, bad_records=bad_records)

    return load


def _ten_percent_mix(root: Path, *, seed: int, require_train: bool, bad_records: str, mix_form: str) -> DatasetSplits:
    return ten_percent_cuhk_vn3k_mix(root, seed, bad_records=bad_records, form=mix_form)


DATASETS: dict[str, DatasetLoader] = {
    **{name: _single(name) for name in READERS},
    "TEN_PERCENT_CUHK_VN3K_MIX": _ten_percent_mix,
}


def load_splits(
    name: str, root: str | Path, *, seed: int, require_train: bool = True, bad_records: str = "fail", mix_form: str
) -> DatasetSplits:
    """The train / validation / test splits of the registered dataset `name` under `root`."""
    return DATASETS[name](
        Path(root), seed=seed, require_train=require_train, bad_records=bad_records, mix_form=mix_form
    )
