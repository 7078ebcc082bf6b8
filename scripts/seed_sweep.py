"""Run one configuration over several seeds and report mean +- std (how TBPS results should be reported).

    uv run python -m scripts.seed_sweep --config cir_msiglip --seeds 2300 2307 2400 -- lora=cir
    uv run python -m scripts.seed_sweep --config demo --seeds 0 1 2 -- trainer.max_epochs=10

Each seed is one `trainer.py` run (its own Hydra folder under --out); the table covers the test split of the checkpoint
selected on validation, and the last epoch. Writes `<out>/seed_sweep.md` and `<out>/seed_sweep.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = [("t2i", "R1"), ("t2i", "R5"), ("t2i", "R10"), ("t2i", "mAP"), ("t2i", "mINP"), ("i2t", "R1"), ("i2t", "mAP")]


def run_training(config: str, overrides: Sequence[str], seed: int, run_dir: Path) -> dict:
    """One `trainer.py` run; returns its results.json plus the seed and wall time."""
    command = [sys.executable, "trainer.py", "-cn", config, *overrides, f"seed={seed}", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {**results, "seed": seed, "seconds": time.perf_counter() - start}


def mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {spread:.2f}"


def summary_rows(runs: Sequence[dict], key: str = "test") -> list[str]:
    """Markdown cells `mean +- std` for COLUMNS over runs (sample standard deviation)."""
    return [mean_std([run[key][task][metric] for run in runs]) for task, metric in COLUMNS]


def table_header() -> list[str]:
    return [
        "| | " + " | ".join(f"{task} {metric}" for task, metric in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cir_msiglip", help="top-level config name (trainer.py -cn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2300, 2307, 2400])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "seed_sweep" / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    runs = []
    for seed in args.seeds:
        runs.append(run_training(args.config, args.overrides, seed, args.out / f"seed{seed}"))
        print(f"seed {seed}: test t2i R1 {runs[-1]['test']['t2i']['R1']:.2f} ({runs[-1]['seconds']:.0f} s)", flush=True)
        atomic_write_json(args.out / "seed_sweep.json", runs)
    lines = [
        f"`trainer.py -cn {args.config} {' '.join(args.overrides)}`, seeds {args.seeds}: mean +- std (sample).",
        "",
        *table_header(),
        "| test (selected on validation) | " + " | ".join(summary_rows(runs, "test")) + " |",
        "| test (last epoch) | " + " | ".join(summary_rows(runs, "test_last")) + " |",
    ]
    report = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "seed_sweep.md", report)
    print(report)


if __name__ == "__main__":
    main()
