"""Command line for the synthetic VN3K generator: ``python -m data.synthetic --out demo_assets``."""

from __future__ import annotations

import argparse
import logging

from data.synthetic.generate import SyntheticSpec, generate_vn3k

_DEFAULTS = SyntheticSpec()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Generate a synthetic bilingual pedestrian dataset in the VN3K layout (<out>/VN3K/...).",
    )
    parser.add_argument("--out", default="demo_assets", help="dataset root; VN3K/ is created inside (%(default)s)")
    parser.add_argument("--identities", type=int, default=_DEFAULTS.num_identities, help="%(default)s")
    parser.add_argument("--images-min", type=int, default=_DEFAULTS.images_per_identity[0], help="%(default)s")
    parser.add_argument("--images-max", type=int, default=_DEFAULTS.images_per_identity[1], help="%(default)s")
    parser.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=list(_DEFAULTS.split_fractions),
        metavar=("TRAIN", "VALIDATE", "TEST"),
        help="fractions of identities (%(default)s)",
    )
    parser.add_argument("--height", type=int, default=_DEFAULTS.image_size[0], help="%(default)s")
    parser.add_argument("--width", type=int, default=_DEFAULTS.image_size[1], help="%(default)s")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="%(default)s")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <out>/VN3K")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parses ``argv`` (default: ``sys.argv[1:]``) and writes the dataset; exits with status 2 on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = SyntheticSpec(
            num_identities=args.identities,
            images_per_identity=(args.images_min, args.images_max),
            split_fractions=tuple(args.split_fractions),
            image_size=(args.height, args.width),
            seed=args.seed,
        )
        generate_vn3k(args.out, spec, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
