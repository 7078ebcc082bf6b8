"""The sweep table: mean +- std per strategy over seeds, the paired difference from the baseline with its 95% CI,
and refusal of runs that differ in more than the swept keys. Expected numbers are worked by hand below.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from scripts.aggregate_sweep import (
    SweepError,
    aggregate,
    check_one_experiment,
    load_runs,
    main,
    t_quantile,
    write_tables,
)
from tests.conftest import compose_config

#: strategy -> seed -> test t2i R1 (every other metric: R1 + 1)
R1 = {"baseline": {0: 10.0, 1: 12.0, 2: 14.0}, "auxiliary": {0: 13.0, 1: 14.0, 2: 18.0}}


def _write_run(folder, strategy, seed, r1, extra=("logger=csv",)):
    cfg = compose_config("demo", [f"loss.strategy={strategy}", f"seed={seed}", *extra])
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")  # as Hydra writes it: unresolved
    table = {"R1": r1, "R5": r1 + 1, "R10": r1 + 1, "mAP": r1 + 1, "mINP": r1 + 1}
    results = {"test": {"t2i": table, "i2t": table}, "test_last": {"t2i": table, "i2t": table}}
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path):
    job = 0
    for strategy, seeds in R1.items():
        for seed, r1 in seeds.items():
            _write_run(tmp_path / str(job), strategy, seed, r1)
            job += 1
    return tmp_path


def test_t_quantiles_equal_the_published_table():
    # Student's t, two-sided 95%: 12.706 (1 df), 4.303 (2), 2.776 (4), 2.262 (9), 2.045 (29).
    for df, published in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(published, abs=6e-4)


def test_means_stds_and_the_paired_difference_from_the_baseline(sweep):
    rows = aggregate(load_runs(sweep), "loss.strategy", "baseline")
    row = {(r["loss.strategy"], r["weights"], r["task"], r["metric"]): r for r in rows}
    base = row["baseline", "selected", "t2i", "R1"]
    # baseline 10, 12, 14: mean 12, sample std 2.
    assert (base["mean"], base["std"], base["seeds"], base["diff_vs_baseline"]) == (12.0, 2.0, 3, None)
    aux = row["auxiliary", "selected", "t2i", "R1"]
    # auxiliary 13, 14, 18: mean 15, std sqrt((4 + 1 + 9) / 2) = sqrt(7). Differences by seed 3, 2, 4: mean 3,
    # std 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.484.
    assert aux["mean"] == pytest.approx(15.0) and aux["std"] == pytest.approx(7**0.5)
    assert aux["diff_vs_baseline"] == pytest.approx(3.0)
    assert aux["ci95_half_width"] == pytest.approx(2.484, abs=1e-3)
    assert row["auxiliary", "last", "i2t", "mINP"]["mean"] == pytest.approx(16.0)


def test_runs_of_another_dataset_are_refused_by_name(sweep):
    _write_run(sweep / "odd", "auxiliary", 3, 20.0, extra=["dataset=vn3k_en", "logger=csv"])
    with pytest.raises(SweepError) as info:
        check_one_experiment(load_runs(sweep), ("loss.strategy", "seed"))
    assert "odd" in str(info.value) and "dataset.dataset_name='VN3K_EN'" in str(info.value)


def test_a_result_without_its_config_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(SweepError, match="not a run written by trainer.py"):
        load_runs(tmp_path)


def test_the_command_writes_markdown_and_csv(sweep, capsys):
    main([str(sweep)])
    table = (sweep / "aggregate.md").read_text()
    assert "| auxiliary | selected | t2i | 3 | 15.00 +- 2.65 (+3.00 +- 2.48)" in table
    assert (sweep / "aggregate.csv").read_text().splitlines()[0].startswith("loss.strategy,weights,task,metric")
    assert "Published" not in table  # the demo's generated data is VN3K in layout only


@pytest.mark.slow
def test_a_hydra_multirun_sweep_aggregates_into_one_table(demo_root, tmp_path):
    """`trainer.py -cn demo -m loss.strategy=baseline,auxiliary seed=0,1` (Hydra's basic launcher), then the table."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import demo_overrides

    root = Path(__file__).resolve().parents[1]
    overrides = [o for o in demo_overrides(demo_root) if not o.startswith("logger=")]
    command = [
        sys.executable,
        "trainer.py",
        "-cn",
        "demo",
        "-m",
        "loss.strategy=baseline,auxiliary",
        "seed=0,1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "dataset.test_batch_size=512",
        "logger=csv",
        f"hydra.sweep.dir={tmp_path}",
        *overrides,
    ]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = aggregate(load_runs(tmp_path), "loss.strategy", "baseline")
    seeds = {(r["loss.strategy"], r["task"], r["metric"]): r["seeds"] for r in rows if r["weights"] == "selected"}
    assert seeds[("baseline", "t2i", "R1")] == 2 and seeds[("auxiliary", "i2t", "mINP")] == 2
    assert all(r["ci95_half_width"] is not None for r in rows if r["loss.strategy"] == "auxiliary")


def test_on_vn3k_vi_the_original_projects_published_numbers_sit_beside_the_table(tmp_path, capsys):
    for job, (strategy, seed) in enumerate([("baseline", 0), ("baseline", 1)]):
        _write_run(
            tmp_path / str(job),
            strategy,
            seed,
            40.0 + seed,
            extra=["dataset=vn3k_vi", "dataset_root_dir=/data", "logger=csv"],
        )
    main([str(tmp_path)])
    table = (tmp_path / "aggregate.md").read_text()
    # The original project's README: t2i 50.53/77.78/86.43/55.94/49.37, i2t 52.35/77.55/86.20/48.97/33.27.
    assert "| t2i | 50.53 | 77.78 | 86.43 | 55.94 | 49.37 |" in table
    assert "| i2t | 52.35 | 77.55 | 86.20 | 48.97 | 33.27 |" in table
    assert "epochs selected on the test split" in table


def test_with_wandb_the_table_is_logged_to_an_offline_run_of_the_sweep(tmp_path, monkeypatch):
    """logger=wandb (the default) in the runs: the table lands in <sweep>/wandb as a wandb.Table, read back here."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = 0
    for strategy, seeds in R1.items():
        for seed, r1 in seeds.items():
            _write_run(tmp_path / str(job), strategy, seed, r1, extra=["logger=wandb", "logger.mode=offline"])
            job += 1
    write_tables(tmp_path)
    (logged,) = tmp_path.glob("wandb/offline-run-*/files/media/table/sweep_table_*.table.json")
    table = json.loads(logged.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    aux = next(
        r
        for r in rows
        if (r["loss.strategy"], r["weights"], r["task"], r["metric"]) == ("auxiliary", "selected", "t2i", "R1")
    )
    # auxiliary 13, 14, 18 against baseline 10, 12, 14 (worked in the test above).
    assert aux["mean"] == pytest.approx(15.0) and aux["std"] == pytest.approx(7**0.5)
    assert aux["diff_vs_baseline"] == pytest.approx(3.0) and aux["ci95_half_width"] == pytest.approx(2.484, abs=1e-3)
    assert len(rows) == 2 * 2 * 2 * 5  # strategies x weights x tasks x metrics


def test_without_wandb_nothing_is_logged(sweep):
    write_tables(sweep)
    assert not (sweep / "wandb").exists()


def test_optuna_trials_are_grouped_by_trial_and_listed_with_their_validation_score(tmp_path):
    """Trials differ in the searched keys (named by .hydra/hydra.yaml, as Hydra writes it), one row group each."""
    searched = {"loss.circle_margin": "interval(0.1, 0.4)", "loss.circle_gamma": "choice(64, 128)"}
    for trial, (margin, gamma, r1, score) in enumerate([(0.2, 64, 10.0, 30.0), (0.3, 128, 12.0, 35.5)]):
        folder = tmp_path / f"trial{trial}"
        _write_run(
            folder,
            "auxiliary_cross",
            0,
            r1,
            extra=["logger=csv", f"loss.circle_margin={margin}", f"loss.circle_gamma={gamma}"],
        )
        sweeper = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "params": searched}
        OmegaConf.save({"hydra": {"sweeper": sweeper, "job": {"num": trial}}}, folder / ".hydra" / "hydra.yaml")
        (folder / "sweep_job.json").write_text(json.dumps({"status": "finished", "val_score": score}))
    table = write_tables(tmp_path)
    assert "| 1 | selected | t2i | 1 | 12.00 +- 0.00 |" in table
    listed = table.split("Optuna trials")[1].splitlines()
    assert "| trial | val_score | loss.circle_margin | loss.circle_gamma |" in listed
    assert listed.index("| 1 | 35.5 | 0.3 | 128 |") < listed.index("| 0 | 30 | 0.2 | 64 |")  # best first
