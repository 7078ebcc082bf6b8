"""Train every Circle-Loss strategy on the embedded dataset over several seeds; write a mean +- std table.

    uv run python -m bench.strategies                       # 5 strategies x 3 seeds, demo config
    uv run python -m bench.strategies --epochs 8 --seeds 0  # quicker look
    uv run python -m bench.strategies --jobs 5 --set dataset.num_workers=2   # parallel runs on a GPU machine

Each run is `trainer.py -cn demo` with the strategy settings of `run_cir_loss.sh` (N-ITC + MVS +
C-ITC common to all, SimCLR off, circle weight 0.1, m 0.25; gamma 128 for the cross-modal strategies as in the README
result). Results: `bench/results/strategies.md` (table) and `bench/results/strategies.json` (every run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from scripts.seed_sweep import mean_std, run_training
from utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

# SimCLR is off: its two extra views per image double the CPU cost of every run (the comparison is the same).
COMMON = ["loss=cir_msiglip", "loss.SS=false", "loss.circle_loss_weight=0.1", "loss.circle_margin=0.25"]
#: strategy -> overrides (the five modes of run_cir_loss.sh).
STRATEGY_OVERRIDES = {
    "baseline": ["loss.strategy=baseline", "loss.CIR=false"],
    "auxiliary": ["loss.strategy=auxiliary", "loss.CIR=true", "loss.circle_gamma=64"],
    "intrinsic": ["loss.strategy=intrinsic", "loss.CIR=false", "loss.circle_gamma=64"],
    "circle_only": ["loss.strategy=circle_only", "loss.CIR=false", "loss.circle_gamma=128"],
    "auxiliary_cross": ["loss.strategy=auxiliary_cross", "loss.CIR=true", "loss.circle_gamma=128"],
}
COLUMNS = [("t2i", "R1"), ("t2i", "mAP"), ("t2i", "mINP"), ("i2t", "R1"), ("i2t", "mAP"), ("i2t", "mINP")]


def run_once(strategy: str, seed: int, epochs: int, out: Path, extra: list[str]) -> dict:
    overrides = [*COMMON, *STRATEGY_OVERRIDES[strategy], f"trainer.max_epochs={epochs}", "logger=csv", *extra]
    run = run_training("demo", overrides, seed, out / "runs" / f"{strategy}_seed{seed}")
    best = Path(run["best_checkpoint"]).resolve() if run.get("best_checkpoint") else None
    if best is not None and best.is_relative_to(ROOT):  # no machine's path in the committed table
        run["best_checkpoint"] = str(best.relative_to(ROOT))
    return {**run, "strategy": strategy}


def table(runs: list[dict], epochs: int) -> str:
    lines = [
        f"Test split of the embedded dataset, demo config, {epochs} epochs, mean +- std over seeds "
        f"{sorted({r['seed'] for r in runs})} (chance t2i R1 {runs[0]['chance_t2i_R1']:.2f}).",
        "",
        "| strategy | " + " | ".join(f"{task} {metric}" for task, metric in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for strategy in STRATEGY_OVERRIDES:
        mine = [r for r in runs if r["strategy"] == strategy]
        if not mine:
            continue
        cells = [mean_std([r["test"][task][metric] for r in mine]) for task, metric in COLUMNS]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_OVERRIDES), choices=list(STRATEGY_OVERRIDES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (a GPU machine with many cores)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every run (repeatable)",
    )
    args = parser.parse_args(argv)
    # The embedded dataset and tiny checkpoint are built once, before parallel runs could race to build them.
    prepare = [
        sys.executable,
        "trainer.py",
        "-cn",
        "demo",
        "+trainer.fast_dev_run=true",
        "logger=csv",
        f"hydra.run.dir={args.out / 'runs' / 'prepare'}",
        "dataset.test_batch_size=1024",
    ]
    subprocess.run(prepare, cwd=ROOT, check=True, capture_output=True)
    runs = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(run_once, strategy, seed, args.epochs, args.out, args.overrides)
            for strategy in args.strategies
            for seed in args.seeds
        ]
        for future in as_completed(futures):
            runs.append(future.result())
            print(
                f"{runs[-1]['strategy']} seed {runs[-1]['seed']}: test t2i R1 {runs[-1]['test']['t2i']['R1']:.2f} "
                f"({runs[-1]['seconds']:.0f} s)",
                flush=True,
            )
            atomic_write_json(args.out / "strategies.json", runs)
    report = table(runs, args.epochs)
    atomic_write_text(args.out / "strategies.md", report)
    print(report)


if __name__ == "__main__":
    main()
