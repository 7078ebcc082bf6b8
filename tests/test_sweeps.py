"""Sweeps as Hydra multiruns: job folders named after the overrides, finished jobs skipped on a second launch, the
state of every job, the launchers (submitit local and SLURM) and the Optuna search of the Circle settings.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sweep_jobs import MAX_FOLDER_NAME, job_folder_name
from tests.conftest import demo_overrides

ROOT = Path(__file__).resolve().parents[1]
#: One epoch of two training batches: enough to select an epoch, write results.json and aggregate.
SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "dataset.test_batch_size=512"]


def _trainer(*arguments: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "trainer.py", *arguments]
    environment = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


def _sweep(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scripts.sweep", *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_job_folder_names_are_the_overrides_as_one_safe_folder_name():
    assert job_folder_name("loss.strategy=baseline,seed=0") == "loss.strategy=baseline,seed=0"
    assert job_folder_name("backbone.path=/data/m 50%") == "backbone.path=%2Fdata%2Fm 50%25"  # one folder, reversible
    assert job_folder_name("") == "no_overrides"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    named = job_folder_name(long_a)
    assert len(named.encode()) <= MAX_FOLDER_NAME and named == job_folder_name(long_a) != job_folder_name(long_b)


@pytest.mark.slow  # two multirun launches of demo jobs
def test_a_second_launch_skips_finished_jobs_and_the_status_names_the_failed_one(demo_root, tmp_path):
    """The baseline job finished in an earlier launch; the other fails on bad input. Nothing trains."""
    overrides = demo_overrides(demo_root)
    # Hydra's override_dirname: the job's overrides sorted, joined by ",", without dataset_root_dir and
    # dataset.num_workers (excluded in train.yaml); "/" would be written %2F.
    baseline = tmp_path / "backbone.tiny=null,dataset.synthetic=null,logger=csv,loss.strategy=baseline"
    (baseline / ".hydra").mkdir(parents=True)
    (baseline / "results.json").write_text("{}")
    (baseline / "sweep_job.json").write_text(json.dumps({"status": "finished", "val_score": 12.5}))
    done = _trainer(
        "-cn", "demo", "-m", "loss.strategy=baseline,no_such_strategy", f"hydra.sweep.dir={tmp_path}", *overrides
    )
    assert done.returncode == 2, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Skipped: " in log and "val_score 12.5" in log
    assert not (baseline / "checkpoints").exists()  # not trained again
    failed = tmp_path / "backbone.tiny=null,dataset.synthetic=null,logger=csv,loss.strategy=no_such_strategy"
    assert json.loads((failed / "sweep_job.json").read_text())["status"] == "failed"

    status = _sweep("status", str(tmp_path))
    assert status.returncode == 1
    lines = status.stdout.splitlines()
    assert any(line.split()[:2] == ["finished", "loss.strategy=baseline"] and "12.50" in line for line in lines)
    failed_line = next(line for line in lines if line.split()[0] == "failed")
    assert "loss.strategy=no_such_strategy" in failed_line and "no_such_strategy" in failed_line.split("(", 1)[1]
    assert "=== 2 job(s): 1 finished, 1 failed, 0 unfinished, 0 not started" in status.stdout
    assert f"uv run python -m scripts.sweep resume {tmp_path}" in status.stdout


@pytest.mark.parametrize("overrides", [["model_selection=test"], ["parity=seed"], ["trainer.limit_val_batches=0"]])
def test_a_search_never_selects_on_the_test_split_nor_on_nothing(overrides):
    from trainer import SweepError, check_search

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose("demo", ["hparams_search=circle_optuna", *overrides], return_hydra_config=True)
        plain = compose("demo", overrides, return_hydra_config=True)
    with pytest.raises(SweepError) as error:
        check_search(cfg, cfg.hydra)
    assert len(str(error.value).splitlines()) == 1 and "hparams_search=circle_optuna" in str(error.value)
    check_search(plain, plain.hydra)  # without a search, selecting on test stays the parity protocol


def test_ddp_jobs_of_a_sweep_need_the_slurm_launcher():
    """Lightning starts DDP's extra processes with the command line, which under -m would run the sweep again."""
    from trainer import SweepError, check_sweep_ddp

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        local, slurm = (
            compose("cir_msiglip", ["trainer=ddp", "hydra.mode=MULTIRUN", *launcher], return_hydra_config=True)
            for launcher in ([], ["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"])
        )
    with pytest.raises(SweepError, match="hydra/launcher=slurm"):
        check_sweep_ddp(local, local.hydra)
    check_sweep_ddp(slurm, slurm.hydra)  # srun starts one process per GPU; Lightning joins them


@pytest.mark.slow  # a demo job through submitit with a fake sbatch
def test_the_slurm_launcher_asks_sbatch_for_one_gpu_and_the_configured_resources(demo_root, tmp_path):
    """hydra/launcher=slurm: the sbatch script submitit writes (stand-in sbatch records it and refuses the job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    for program in ("sbatch", "srun"):
        (bin_dir / program).chmod(0o755)
    done = _trainer(
        "-cn", "demo", "-m", "seed=0,1,2", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90", "hydra.launcher.mem_gb=48", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *demo_overrides(demo_root),
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode != 0  # the stand-in refused the submission
    script = (tmp_path / "submitted.sh").read_text().splitlines()
    # sbatch's options (https://slurm.schedmd.com/sbatch.html): --time in minutes, --mem in GB with a suffix.
    for option in ("--partition=gpu", "--time=90", "--mem=48GB", "--gpus-per-node=1", "--cpus-per-task=8"):
        assert f"#SBATCH {option}" in script, option
    assert "#SBATCH --array=0-2%3" in script  # the three jobs as one array (at most array_parallelism at once)


def _metric(results: Path, selection: str, task: str, metric: str) -> float:
    return json.loads(results.read_text())[selection][task][metric]


@pytest.mark.slow
def test_a_submitit_local_sweep_aggregates_and_a_second_launch_runs_only_the_job_that_died(demo_root, tmp_path):
    """2 strategies x 2 seeds, each job its own process (hydra/launcher=local: submitit's local executor)."""
    command = [
        "-cn", "demo", "-m", "loss.strategy=baseline,auxiliary", "seed=0,1", "hydra/launcher=local",
        "hydra.launcher.gpus_per_node=0", f"hydra.sweep.dir={tmp_path}", *SHORT, *demo_overrides(demo_root),
    ]  # fmt: skip
    done = _trainer(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("*/results.json"))
    assert len(results) == 4
    jobs = [json.loads((r.parent / "sweep_job.json").read_text()) for r in results]
    assert len({job["pid"] for job in jobs}) == 4 and os.getpid() not in {job["pid"] for job in jobs}

    subprocess.run([sys.executable, "-m", "scripts.aggregate_sweep", str(tmp_path)], cwd=ROOT, check=True)
    with (tmp_path / "aggregate.csv").open() as table:
        rows = {(r["loss.strategy"], r["weights"], r["task"], r["metric"]): r for r in csv.DictReader(table)}
    for strategy in ("baseline", "auxiliary"):
        mine = [r for r in results if f"loss.strategy={strategy}," in r.parent.name]
        for selection, weights in (("test", "selected"), ("test_last", "last")):
            values = [_metric(r, selection, "t2i", "R1") for r in mine]
            row = rows[strategy, weights, "t2i", "R1"]
            assert row["seeds"] == "2"
            assert float(row["mean"]) == pytest.approx(statistics.mean(values))
            assert float(row["std"]) == pytest.approx(statistics.stdev(values))
    assert _sweep("status", str(tmp_path)).returncode == 0

    # A job killed mid-run leaves its status "running" and no results.json.
    died = next(r for r in results if "loss.strategy=auxiliary," in r.parent.name and "seed=1" in r.parent.name)
    died.unlink()
    status_file = died.parent / "sweep_job.json"
    status_file.write_text(json.dumps({**json.loads(status_file.read_text()), "status": "running"}))
    status = _sweep("status", str(tmp_path))
    assert status.returncode == 1 and "=== 4 job(s): 3 finished, 0 failed, 1 unfinished" in status.stdout
    assert any(line.split()[0] == "unfinished" and "died" in line for line in status.stdout.splitlines())
    kept = {r: r.stat().st_mtime_ns for r in results if r != died}

    resumed = _sweep("resume", str(tmp_path))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert died.is_file() and "=== 4 job(s): 4 finished" in resumed.stdout
    assert all(r.stat().st_mtime_ns == mtime for r, mtime in kept.items())  # finished jobs were not run again
    for r in kept:
        assert "Skipped: " in (r.parent / "trainer.log").read_text()
    assert "Skipped: " not in (died.parent / "trainer.log").read_text()


@pytest.mark.slow
def test_an_optuna_search_of_three_trials_lands_in_the_sweep_table(demo_root, tmp_path):
    search = [
        "-cn", "demo", "hparams_search=circle_optuna", "hydra.sweeper.n_trials=3", "loss.strategy=auxiliary_cross",
        f"hydra.sweep.dir={tmp_path}", *SHORT, *demo_overrides(demo_root),
    ]  # fmt: skip
    done = _trainer(*search)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sorted(tmp_path.glob("*/results.json"))
    assert len(trials) == 3
    scores = []
    for results in trials:
        job = json.loads((results.parent / "sweep_job.json").read_text())
        # The score returned to Optuna is the selected checkpoint's, which Lightning names epochNN-val_scoreS.ckpt.
        best = Path(json.loads(results.read_text())["best_checkpoint"]).stem
        assert f"{job['val_score']:.2f}" == best.split("val_score")[1]
        scores.append(job["val_score"])
        config = OmegaConf.load(results.parent / ".hydra" / "config.yaml")
        assert 0.1 <= config.loss.circle_margin <= 0.4 and config.loss.circle_gamma in (32, 64, 128, 256)
        assert 3e-5 <= config.optimizer.param_groups.default.lr <= 1e-3
    assert OmegaConf.load(tmp_path / "optimization_results.yaml").best_value == pytest.approx(max(scores))

    subprocess.run([sys.executable, "-m", "scripts.aggregate_sweep", str(tmp_path)], cwd=ROOT, check=True)
    table = (tmp_path / "aggregate.md").read_text()
    assert table.startswith("| trial | weights | task | seeds |")
    trial_lines = [line for line in table.split("Optuna trials")[1].splitlines() if line.startswith("| ")]
    assert trial_lines[0].split(" | ")[:2] == ["| trial", "val_score"] and len(trial_lines) == 4
    assert f"{max(scores):.4g}" in trial_lines[1]  # best first
    with (tmp_path / "aggregate.csv").open() as csv_table:
        assert {row["trial"] for row in csv.DictReader(csv_table)} == {"0", "1", "2"}

    # The same search again: the seeded sampler proposes the same trials, each found finished in its folder.
    again = _trainer(*search)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("Skipped: ") == 3 and sorted(tmp_path.glob("*/results.json")) == trials
