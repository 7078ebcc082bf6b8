"""Train every Circle-Loss strategy on the embedded dataset over several seeds; write a mean +- std table.

    uv run python -m bench.strategies                       # 5 strategies x 3 seeds, demo config
    uv run python -m bench.strategies --epochs 8 --seeds 0  # quicker look
    uv run python -m bench.strategies --set hydra/launcher=local --set dataset.num_workers=2   # every run at once

One Hydra multirun of `trainer.py -cn demo` over loss.strategy x seed (scripts/sweep.py), with the Circle-Loss recipe
of run_cir_loss.sh: N-ITC + MVS + C-ITC common to all, SimCLR off (its two extra views per image double the CPU cost
of every run; the comparison is the same), circle weight 0.1, m 0.25, gamma 128. The sweep folder is
`multirun/bench_strategies/<epochs>_epochs`: the same command again runs only the jobs that did not finish. Its table
(scripts/aggregate_sweep.py: mean +- std over seeds, each strategy's paired difference from baseline) is copied to
`<out>/strategies.md` and `<out>/strategies.csv`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.aggregate_sweep import write_tables
from scripts.sweep import ROOT, launch, report
from utils.io import atomic_write_text

STRATEGIES = ["baseline", "auxiliary", "intrinsic", "circle_only", "auxiliary_cross"]
COMMON = [
    "loss=cir_msiglip",
    "loss.SS=false",
    "loss.circle_loss_weight=0.1",
    "loss.circle_margin=0.25",
    "loss.circle_gamma=128",
    "logger=csv",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--sweep-dir", type=Path, help="the sweep folder (default multirun/bench_strategies/...)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every run (repeatable), e.g. hydra/launcher=local",
    )
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir or ROOT / "multirun" / "bench_strategies" / f"{args.epochs}_epochs"
    if any(override.startswith("hydra/launcher=") for override in args.overrides):
        # The embedded dataset and tiny checkpoint are built once, first: parallel jobs would race to build them.
        with tempfile.TemporaryDirectory() as scratch:
            prepare = [sys.executable, "trainer.py", "-cn", "demo", "+trainer.fast_dev_run=true", "logger=csv"]
            own = [override for override in args.overrides if not override.startswith("hydra")]  # not the launcher
            prepare += [f"hydra.run.dir={scratch}", "dataset.test_batch_size=1024", *own]
            subprocess.run(prepare, cwd=ROOT, check=True, capture_output=True)
    sweep = [f"loss.strategy={','.join(args.strategies)}", f"seed={','.join(map(str, args.seeds))}"]
    launched = launch("demo", sweep_dir, [*sweep, f"trainer.max_epochs={args.epochs}", *COMMON, *args.overrides])
    status, done = report(sweep_dir)
    print(status)
    table = write_tables(sweep_dir, use_wandb=False)
    heading = (
        f"Test split of the embedded dataset, demo config, {args.epochs} epochs, strategies x seeds {args.seeds} "
        f"(`uv run python -m bench.strategies {' '.join(argv if argv is not None else sys.argv[1:])}`).\n\n"
    )
    atomic_write_text(args.out / "strategies.md", heading + table)
    atomic_write_text(args.out / "strategies.csv", (sweep_dir / "aggregate.csv").read_text())
    print(table)
    return 0 if launched == 0 and done else 1


if __name__ == "__main__":
    raise SystemExit(main())
