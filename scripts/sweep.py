"""Where a sweep stands, and launching it again so that only its unfinished jobs run.

    uv run python -m scripts.sweep status multirun/2026-11-27/10-00-00   # every job: finished, failed, unfinished
    uv run python -m scripts.sweep resume multirun/2026-11-27/10-00-00   # the same multirun again, same folder

A sweep is one Hydra multirun of trainer.py (`-m`, any launcher, the basic sweeper or `hparams_search=...`); its
folder holds `sweep.json` (the command) and one folder per job named after the job's overrides, with
`sweep_job.json` (its state) and, once it finished, `results.json` (sweep_jobs.py). A job is

- finished:    results.json exists (re-launching skips it);
- failed:      it stopped with an error (the reason is shown: bad input, SIGTERM, an exception);
- unfinished:  it started and neither finished nor recorded a failure: it died (killed, out of memory, node lost,
               SLURM time limit) or is still running;
- not started: the basic sweeper's job list has it, but it has no folder (e.g. cancelled while queued).

`status` exits 0 when every job finished, 1 otherwise. `resume` launches the recorded multirun again with
`hydra.sweep.dir` set to this folder: finished jobs are skipped (their log says so), every other job runs again in
its own folder. Launching the original command again with `hydra.sweep.dir=<folder>` does the same.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweep_jobs import RECORD_FILE, read_status
from utils.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


class SweepFolderError(InputError):
    """The folder is not a sweep launched by trainer.py (no sweep.json)."""


@dataclass(frozen=True)
class Job:
    state: str  # finished | failed | unfinished | not started
    overrides: tuple[str, ...]
    detail: str = ""


def read_record(sweep_dir: Path) -> dict[str, Any]:
    record = sweep_dir / RECORD_FILE
    try:
        return json.loads(record.read_text())
    except FileNotFoundError:
        raise SweepFolderError(
            f"{record} does not exist: {sweep_dir} is not a sweep folder of trainer.py -m (give hydra.sweep.dir)."
        ) from None


def relaunch_command(sweep_dir: Path, record: dict[str, Any]) -> list[str]:
    """The multirun that launched the sweep, writing into `sweep_dir` again (arguments after `python`)."""
    return [
        "trainer.py",
        "-cn",
        record["config_name"],
        "-m",
        f"hydra.sweep.dir={sweep_dir.resolve()}",
        *record["hydra_overrides"],
        *record["task_overrides"],
    ]


def launch(config: str, sweep_dir: Path, overrides: Sequence[str]) -> int:
    """Run `trainer.py -cn CONFIG -m hydra.sweep.dir=SWEEP_DIR OVERRIDES` (one Hydra multirun); its exit status."""
    command = [sys.executable, "trainer.py", "-cn", config, "-m", f"hydra.sweep.dir={sweep_dir.resolve()}", *overrides]
    print(f"Launching: {shlex.join(command)}", flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def expected_jobs(record: dict[str, Any]) -> list[tuple[str, ...]] | None:
    """Every job's overrides, as the basic sweeper lists them; None for another sweeper (its jobs are not known)."""
    if record["sweeper"] != "basic":
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    # What BasicSweeper.sweep expands: hydra.sweeper.params first, then the command line.
    lines = [f"{key}={value}" for key, value in record["params"].items()] + record["task_overrides"]
    try:
        (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), None)
    except HydraException:  # e.g. glob(...) over a config group, which needs the config loader to expand
        return None
    return [tuple(job) for job in jobs]


def _job_overrides(folder: Path) -> tuple[str, ...]:
    overrides = folder / ".hydra" / "overrides.yaml"
    recorded = read_status(folder).get("overrides")
    if recorded is None and overrides.is_file():
        recorded = OmegaConf.to_container(OmegaConf.load(overrides))
    return tuple(recorded or (folder.name,))


def job_states(sweep_dir: Path, record: dict[str, Any]) -> list[Job]:
    """Every job of the sweep with its state, the folders first (by name), then the jobs not started."""
    jobs = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        status = read_status(folder)
        overrides = _job_overrides(folder)
        if (folder / "results.json").is_file():
            score = status.get("val_score")
            jobs.append(Job("finished", overrides, "" if score is None else f"val_score {score:.2f}"))
        elif status.get("status") == "failed":
            jobs.append(Job("failed", overrides, status.get("reason", "")))
        else:
            since = f"started {status['started']} on {status['host']}" if status else "no status file"
            slurm = f", SLURM job {status['slurm_job_id']}" if status.get("slurm_job_id") else ""
            jobs.append(Job("unfinished", overrides, f"{since}{slurm}: died, or still running"))
    expected = expected_jobs(record)
    if expected is not None:
        seen = {frozenset(job.overrides) for job in jobs}
        jobs += [Job("not started", job) for job in expected if frozenset(job) not in seen]
    return jobs


def report(sweep_dir: Path) -> tuple[str, bool]:
    """The status text of the sweep and whether every job finished."""
    record = read_record(sweep_dir)
    jobs = job_states(sweep_dir, record)
    command = ["uv", "run", *relaunch_command(sweep_dir, record)]
    lines = [f"Sweep {sweep_dir} ({record['sweeper']} sweeper, {record['launcher']} launcher): {shlex.join(command)}"]
    fixed = set.intersection(*(set(job.overrides) for job in jobs)) if len(jobs) > 1 else set()
    for job in jobs:
        own = " ".join(o for o in job.overrides if o not in fixed) or " ".join(job.overrides)
        lines.append(f"  {job.state:<11} {own}" + (f"  ({job.detail})" if job.detail else ""))
    counts = {state: sum(job.state == state for job in jobs) for state in ("finished", "failed", "unfinished")}
    not_started = sum(job.state == "not started" for job in jobs)
    trials = record.get("n_trials") if record["sweeper"] != "basic" else None
    if trials is not None:
        not_started = max(trials - len(jobs), 0)
    total = len(jobs) if trials is None else max(trials, len(jobs))
    summary = ", ".join(f"{count} {state}" for state, count in counts.items())
    lines.append(f"=== {total} job(s): {summary}, {not_started} not started")
    done = counts["finished"] == total
    if not done:
        lines.append(
            f"Run the jobs that did not finish (finished ones are skipped): "
            f"uv run python -m scripts.sweep resume {shlex.quote(str(sweep_dir))}"
        )
    return "\n".join(lines), done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["status", "resume"])
    parser.add_argument("folder", type=Path, help="the sweep folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        launched = 0
        if args.action == "resume":
            command = relaunch_command(args.folder, read_record(args.folder))
            print(f"Launching: {shlex.join([sys.executable, *command])}", flush=True)
            launched = subprocess.run([sys.executable, *command], cwd=ROOT).returncode
        text, done = report(args.folder)
    except InputError as error:
        print(error, file=sys.stderr)
        return 2
    print(text)
    return 0 if done and launched == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
