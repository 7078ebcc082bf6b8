"""Run one configuration over several seeds and report mean +- std (how TBPS results should be reported).

    uv run python -m scripts.seed_sweep --config cir_msiglip --seeds 2300 2307 2400 -- lora=cir
    uv run python -m scripts.seed_sweep --config demo --seeds 0 1 2 --out multirun/demo_seeds -- trainer.max_epochs=10

The short form of `uv run trainer.py -cn CONFIG -m seed=2300,2307,2400 hydra.sweep.dir=OUT OVERRIDES...` followed by
`uv run python -m scripts.sweep status OUT` and `uv run python -m scripts.aggregate_sweep OUT`: one Hydra multirun
(any launcher: `-- hydra/launcher=slurm`), every seed's state, then `OUT/aggregate.md` and `OUT/aggregate.csv`
(mean +- std over seeds of the test split, for the checkpoint selected on validation and for the last epoch). The
same command with the same --out runs only the seeds that did not finish.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scripts.aggregate_sweep import SweepError, write_tables
from scripts.sweep import ROOT, launch, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cir_msiglip", help="top-level config name (trainer.py -cn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2300, 2307, 2400])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "multirun" / "seed_sweep" / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    launched = launch(args.config, args.out, [f"seed={','.join(map(str, args.seeds))}", *args.overrides])
    status, done = report(args.out)
    print(status)
    try:
        print(write_tables(args.out))
    except SweepError as error:
        print(error, file=sys.stderr)
        return 1
    return 0 if launched == 0 and done else 1


if __name__ == "__main__":
    raise SystemExit(main())
