"""One table for a sweep: mean +- std over seeds per strategy, and each strategy's difference from the baseline.

    uv run python -m scripts.aggregate_sweep multirun/2026-11-27/10-00-00          # any folder of finished runs
    uv run python -m scripts.aggregate_sweep SWEEP --by loss.strategy --baseline baseline
    uv run python -m scripts.aggregate_sweep multirun/2026-11-27/11-00-00          # an hparams_search sweep

Every `results.json` under the folder is one run; its `.hydra/config.yaml` (written by Hydra next to it) says what
ran. The runs must differ only in the swept keys (`--by` and `seed`): a sweep that mixes datasets or other settings
is refused, naming the runs and the keys that differ. The trials of an Optuna search (`hparams_search=...`) are
grouped by trial (`.hydra/hydra.yaml` names the searched keys, which may differ), and a second table lists each
trial's settings and the validation score it was chosen on. For every metric (t2i and i2t R1/R5/R10/mAP/mINP, of the
checkpoint selected on validation and of the last epoch) the table gives the mean +- sample standard deviation
over seeds, the number of seeds, and the difference from `--baseline` paired by seed with its 95% confidence
interval (Student's t over the per-seed differences): the effect under study is about the size of the seed-to-seed
spread, so a bare mean misleads. On VN3K_VI the original project's published numbers are printed beside the table.
Writes `aggregate.md` and `aggregate.csv` into the sweep folder. When the runs logged to W&B (`logger=wandb`, the
default), the tables are also logged as `wandb.Table`s to a run of the sweep's own in `<folder>/wandb`, with the
runs' project and mode (offline by default: `wandb sync` uploads it).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweep_jobs import read_status
from utils.errors import InputError
from utils.io import atomic_write_text

TASKS = ("t2i", "i2t")
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
#: Which weights a number is about: the checkpoint selected on validation, and the last epoch.
SELECTIONS = {"test": "selected", "test_last": "last"}


#: Numbers the original project published (its READMEs), by dataset, printed beside a sweep on that dataset. Its
#: epochs were selected on the test split (`model_selection=test`, `parity=seed`); this framework's default selects
#: on validation, which reads lower.
PUBLISHED: dict[str, list[tuple[str, dict[str, tuple[float, ...]]]]] = {
    "VN3K_VI": [
        ("TBPS-mSigLIP, full fine-tuning (batch 8)", {"t2i": (49.70, 75.93, 84.75, 54.96, 48.66)}),
        ("LoRA r32, N-ITC only", {"t2i": (49.90, 78.05, 86.30, 55.83, 49.45)}),
        (
            "LoRA r32 + cross-modal Circle (auxiliary_cross, m 0.25, gamma 128)",
            {"t2i": (50.53, 77.78, 86.43, 55.94, 49.37), "i2t": (52.35, 77.55, 86.20, 48.97, 33.27)},
        ),
    ]
}


class SweepError(InputError):
    """The folder holds no runs, a run lacks its config, or the runs differ in more than the swept keys."""


#: The group key of an Optuna search's runs: the trial number (Hydra's job number, which the sweeper gives the trial).
TRIAL = "trial"


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "loss.strategy" -> "auxiliary"; an Optuna trial's also has TRIAL
    results: dict[str, Any]
    searched: tuple[str, ...] = ()  # the keys an Optuna search chose this run's values of

    def value(self, selection: str, task: str, metric: str) -> float | None:
        return (self.results.get(selection) or {}).get(task, {}).get(metric)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


def _search_of(run_dir: Path) -> tuple[int, tuple[str, ...]] | None:
    """(trial number, searched keys) of a run that an Optuna search launched, else None."""
    written = run_dir / ".hydra" / "hydra.yaml"
    if not written.is_file():
        return None
    hydra_cfg = OmegaConf.load(written).hydra
    if "optuna" not in str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="")).lower():
        return None
    return int(hydra_cfg.job.num), tuple(hydra_cfg.sweeper.params or ())


def load_runs(folder: Path) -> list[Run]:
    runs = []
    for results in sorted(folder.rglob("results.json")):
        config = results.parent / ".hydra" / "config.yaml"
        if not config.is_file():
            raise SweepError(f"{results} has no {config.relative_to(results.parent)}: not a run written by trainer.py.")
        flat = _flatten(OmegaConf.to_container(OmegaConf.load(config), resolve=False))
        searched: tuple[str, ...] = ()
        if (search := _search_of(results.parent)) is not None:
            flat[TRIAL], searched = search
        runs.append(Run(results.parent, flat, json.loads(results.read_text()), searched))
    if not runs:
        raise SweepError(f"no results.json under {folder}: no run of this sweep has finished.")
    return runs


def check_one_experiment(runs: list[Run], swept: tuple[str, ...]) -> None:
    """Refuse runs that differ in anything but the swept keys, naming the keys and the runs."""
    reference = runs[0]
    problems = []
    for run in runs[1:]:
        keys = sorted(
            key
            for key in set(run.config) | set(reference.config)
            if key not in swept and run.config.get(key) != reference.config.get(key)
        )
        if keys:
            shown = ", ".join(f"{key}={run.config.get(key)!r} (vs {reference.config.get(key)!r})" for key in keys[:5])
            problems.append(f"{run.path} differs from {reference.path} in {shown}")
    if problems:
        raise SweepError(
            f"the runs differ in more than {list(swept)}; aggregate each experiment separately:\n  - "
            + "\n  - ".join(problems)
        )


def t_quantile(probability: float, df: int) -> float:
    """Quantile of Student's t distribution with `df` degrees of freedom (bisection on its CDF, integrated)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # for x >= 0: 1/2 + integral of the density over [0, x] (Simpson, 2000 panels)
        steps = 2000
        h = x / steps
        density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> tuple[float, float, int] | None:
    """(mean difference, 95% CI half-width, seeds) over the seeds both have; None with fewer than two."""
    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None
    differences = [values[seed] - baseline[seed] for seed in seeds]
    half_width = t_quantile(0.975, len(seeds) - 1) * statistics.stdev(differences) / math.sqrt(len(seeds))
    return statistics.mean(differences), half_width, len(seeds)


def aggregate(runs: list[Run], by: str, baseline: str) -> list[dict[str, Any]]:
    """One row per (group, selection, task, metric): mean, std, seeds, and the paired difference from `baseline`."""
    groups: dict[Any, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config.get(by), []).append(run)
    rows = []
    for group, members in groups.items():
        for selection, label in SELECTIONS.items():
            for task in TASKS:
                for metric in METRICS:
                    per_seed = _per_seed(members, selection, task, metric)
                    if not per_seed:
                        continue
                    base = _per_seed(groups.get(baseline, []), selection, task, metric)
                    values = list(per_seed.values())
                    difference = paired_difference(per_seed, base) if group != baseline else None
                    rows.append(
                        {
                            by: group,
                            "weights": label,
                            "task": task,
                            "metric": metric,
                            "seeds": len(values),
                            "mean": statistics.mean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "diff_vs_baseline": difference[0] if difference else None,
                            "ci95_half_width": difference[1] if difference else None,
                        }
                    )
    return rows


def _per_seed(runs: list[Run], selection: str, task: str, metric: str) -> dict[int, float]:
    values = {}
    for run in runs:
        value = run.value(selection, task, metric)
        if value is not None:
            values[run.config.get("seed")] = value
    return values


def published_block(dataset: str | None) -> list[str]:
    """Markdown lines with the original project's published numbers for `dataset` (none for other datasets)."""
    if dataset not in PUBLISHED:
        return []
    lines = [
        "",
        f"Published by the original project on {dataset} (its READMEs; epochs selected on the test split):",
        "",
        "| run | task | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for label, tasks in PUBLISHED[dataset]:
        lines += [
            f"| {label} | {task} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for task, values in tasks.items()
        ]
    return lines


def markdown(rows: list[dict[str, Any]], by: str, baseline: str, dataset: str | None = None) -> str:
    lines = [
        f"| {by} | weights | task | seeds | " + " | ".join(METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    cells: dict[tuple, dict[str, str]] = {}
    for row in rows:
        cell = f"{row['mean']:.2f} +- {row['std']:.2f}"
        if row["diff_vs_baseline"] is not None:
            cell += f" ({row['diff_vs_baseline']:+.2f} +- {row['ci95_half_width']:.2f})"
        cells.setdefault((row[by], row["weights"], row["task"], row["seeds"]), {})[row["metric"]] = cell
    for (group, weights, task, seeds), metrics in cells.items():
        lines.append(
            f"| {group} | {weights} | {task} | {seeds} | " + " | ".join(metrics.get(m, "") for m in METRICS) + " |"
        )
    lines += [
        "",
        f"mean +- sample std over seeds; in brackets the difference from `{baseline}` paired by seed, +- the "
        "half-width of its 95% confidence interval (Student's t); an interval that contains 0 shows no effect beyond "
        "the seeds' spread.",
        *published_block(dataset),
    ]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def trial_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per Optuna trial, best first: its number, the validation score it was chosen on, the searched values."""
    rows = [
        {TRIAL: run.config[TRIAL], "val_score": read_status(run.path).get("val_score")}
        | {key: run.config.get(key) for key in run.searched}
        for run in runs
        if run.searched
    ]
    return sorted(rows, key=lambda row: (row["val_score"] is not None, row["val_score"] or 0.0), reverse=True)


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = [
        "",
        "Optuna trials, best first by the validation score the search maximised (the test split played no part):",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[column]) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def log_to_wandb(folder: Path, config: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> Path | None:
    """Log each table as a `wandb.Table` to a W&B run of the sweep's own, in `<folder>/wandb`.

    Only when the runs logged to W&B (`logger.type`), with their project and mode. Returns the W&B run's folder, or
    None without W&B.
    """
    if config.get("logger.type") != "wandb":
        return None
    import wandb

    run = wandb.init(
        project=config.get("logger.project"),
        mode=config.get("logger.mode"),
        dir=str(folder),
        name=f"aggregate_{folder.resolve().name}",
        job_type="aggregate",
        config={"sweep_folder": str(folder.resolve())},
    )
    for name, rows in tables.items():
        if rows:
            columns = list(rows[0])
            data = [[row[column] for column in columns] for row in rows]
            run.log({name: wandb.Table(columns=columns, data=data, allow_mixed_types=True)})
    run.finish()
    return Path(run.dir).parent


def write_tables(folder: Path, by: str | None = None, baseline: str = "baseline", use_wandb: bool = True) -> str:
    """Aggregate the runs under `folder`: write aggregate.md / aggregate.csv (and log to W&B); return the markdown.

    `by` defaults to `loss.strategy`, or to the trial for an Optuna search.

    Raises:
        SweepError: no finished run, a run without its config, or runs that differ in more than the swept keys.
    """
    runs = load_runs(folder)
    searched = sorted({key for run in runs for key in run.searched})
    by = by or (TRIAL if searched else "loss.strategy")
    check_one_experiment(runs, (by, "seed", *searched, *([TRIAL] if searched else [])))
    rows = aggregate(runs, by, baseline)
    trials = trial_rows(runs)
    config = runs[0].config
    generated = any(key.startswith("dataset.synthetic.") for key in config)  # the demo's data, VN3K in layout only
    table = markdown(rows, by, baseline, None if generated else config.get("dataset.dataset_name"))
    table += trials_markdown(trials)
    atomic_write_text(folder / "aggregate.md", table)
    atomic_write_text(folder / "aggregate.csv", to_csv(rows))
    if use_wandb:
        log_to_wandb(folder, config, {"sweep_table": rows, "trials": trials})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep folder (e.g. a Hydra multirun folder)")
    parser.add_argument(
        "--by", default=None, help="the swept key the rows are grouped by (default: loss.strategy; an Optuna trial)"
    )
    parser.add_argument("--baseline", default="baseline", help="the group every other is compared with")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the tables to W&B, even if the runs did")
    args = parser.parse_args(argv)
    try:
        print(write_tables(args.folder, args.by, args.baseline, use_wandb=not args.no_wandb))
    except SweepError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
