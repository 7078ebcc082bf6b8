"""Report which datasets under a data root are present, missing or malformed (used by setup.sh).

A dataset whose folder is absent is `missing` (each dataset is optional); a folder that exists but whose layout,
annotation or image files are wrong is `malformed`, and any malformed dataset makes the exit status 1. An annotation
with test records only is `test-only`: it serves evaluation (`train=false`), not training. Every reader
is checked, so the variants that share a folder (VN3K_VI, VN3K_EN, VN3K_MIXED) are reported one by one.

uv run python -m data.check --root /data/tbps
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data.datasets import ImageNotFoundError
from data.images import check_images
from data.readers import READERS, DatasetFormatError, DatasetLayoutError, DatasetNotFoundError, read_dataset

#: Every reader: the variants of one folder read different caption keys, so one can be malformed where another is ok.
CHECKED = tuple(READERS)


def check_dataset(name: str, root: Path) -> tuple[str, str]:
    """Return (status, detail): status is `ok`, `test-only` (no training records), `missing` (no dataset folder) or
    `malformed` (a misnamed part of the folder, a bad annotation or missing image files).
    """
    try:
        splits = read_dataset(name, root, require_train=False)
    except DatasetLayoutError as error:  # the folder is there, so the dataset is meant to be: its layout is wrong
        return "malformed", str(error)
    except DatasetNotFoundError as error:
        return "missing", str(error)
    except (DatasetFormatError, ValueError) as error:
        return "malformed", str(error)
    try:
        check_images(splits, "fail")
    except ImageNotFoundError as error:
        return "malformed", str(error)
    rows = ", ".join(
        f"{subset} {ids} ids / {images} images / {captions} captions"
        for subset, ids, images, captions in splits.summary_rows()
    )
    if not splits.train:
        return "test-only", f"{rows}; no training records: evaluation only (train=false ckpt_path=...)"
    return "ok", rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="folder holding CUHK-PEDES/, VN3K/, ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    malformed = 0
    for name in CHECKED:
        status, detail = check_dataset(name, args.root)
        malformed += status == "malformed"
        print(f"{name:12s} {status:9s} {detail}")
    return 1 if malformed else 0


if __name__ == "__main__":
    raise SystemExit(main())
