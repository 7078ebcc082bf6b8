"""Report which datasets under a data root are present, missing or malformed (used by setup.sh).

uv run python -m data.check --root /data/tbps
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data.datasets import ImageNotFoundError
from data.images import check_images
from data.readers import READERS, DatasetFormatError, read_dataset

#: One reader per dataset folder is enough to check it (the VN3K variants share VN3K/).
CHECKED = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "VN3K_VI")


def check_dataset(name: str, root: Path) -> tuple[str, str]:
    """Return (status, detail): status is `ok`, `missing` or `malformed` (bad annotation or missing image files)."""
    try:
        splits = read_dataset(name, root)
    except FileNotFoundError as error:
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
    return "ok", rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="folder holding CUHK-PEDES/, VN3K/, ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    malformed = 0
    for name in CHECKED:
        assert name in READERS
        status, detail = check_dataset(name, args.root)
        malformed += status == "malformed"
        print(f"{name:12s} {status:9s} {detail}")
    return 1 if malformed else 0


if __name__ == "__main__":
    raise SystemExit(main())
