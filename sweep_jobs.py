"""The jobs of a Hydra sweep (`trainer.py -m ...`, any launcher or sweeper): stable folders, a status file each, and
the record of the command that launched the sweep.

- A job's folder is `<hydra.sweep.dir>/<its overrides>` (config/hydra/output/job_folders.yaml names it with
  `${job_folder:${hydra.job.override_dirname}}`), not its job number: launching the same sweep again, or SLURM
  re-queueing a job, finds the same folder. `trainer.py` skips a job whose folder already holds `results.json`.
- `sweep_job.json` in the job folder says `running` (from the start; a job that died stays so), `finished` (with the
  selected epoch's validation score, what an Optuna search maximises) or `failed` (and why).
- `sweep.json` in the sweep folder, written by the `SweepRecord` Hydra callback when the multirun starts, holds the
  config name and the overrides: `scripts/sweep.py` reports every job's state and launches the sweep again from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from utils.errors import InputError, user_message
from utils.io import atomic_write_json

STATUS_FILE = "sweep_job.json"
RECORD_FILE = "sweep.json"
#: Longest job folder name in bytes: file systems allow 255, and Hydra's overrides of a real sweep can exceed it.
MAX_FOLDER_NAME = 200
#: Overrides the launcher adds to the command line; the relaunch command sets them itself.
LAUNCH_ONLY_OVERRIDES = ("hydra.mode=", "hydra.sweep.dir=")


def job_folder_name(override_dirname: str) -> str:
    """A job folder's name from Hydra's `hydra.job.override_dirname` (`loss.strategy=baseline,seed=0`).

    `/` in a value (a path) is written `%2F` so the job stays one folder; a name over MAX_FOLDER_NAME bytes is cut
    and ends with a hash of the whole, so it stays unique and the same at every launch.
    """
    name = override_dirname.replace("%", "%25").replace("/", "%2F") or "no_overrides"
    encoded = name.encode()
    if len(encoded) <= MAX_FOLDER_NAME:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    return encoded[: MAX_FOLDER_NAME - len(digest) - 1].decode(errors="ignore") + "-" + digest


def register_job_folder_resolver() -> None:
    """Register `${job_folder:...}`. Idempotent."""
    if not OmegaConf.has_resolver("job_folder"):
        OmegaConf.register_new_resolver("job_folder", job_folder_name)


# At import, not only from trainer.py: a submitit job unpickles trainer's task function in a fresh process, and
# importing this module (which that function refers to) is what registers the resolver before Hydra names the folder.
register_job_folder_resolver()


def _reason(error: BaseException) -> str:
    """One line on why a job stopped, for its status file."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # loaded by trainer.py already

    if isinstance(error, InputError):
        return user_message(error).splitlines()[-1].strip(" -")
    if isinstance(error, SIGTERMException) or (isinstance(error, SystemExit) and error.code == 143):
        return "stopped by SIGTERM (preempted or cancelled); launch the sweep again to run it"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, SystemExit):
        return f"exit status {error.code}"
    return f"{type(error).__name__}: {error}"[:500]


class SweepJob:
    """The status file of one sweep job; as a context manager it records the start, then the end or the failure.

    Args:
        folder: the job's folder (`hydra.runtime.output_dir`).
        overrides: the job's overrides (`hydra.overrides.task`).
    """

    def __init__(self, folder: Path, overrides: list[str]):
        self.folder = folder
        self.overrides = overrides
        self.val_score: float | None = None

    @property
    def finished(self) -> bool:
        """Whether an earlier launch finished this job (its results.json exists)."""
        return (self.folder / "results.json").is_file()

    def recorded(self) -> dict[str, Any]:
        """The status file's content ({} when there is none)."""
        return read_status(self.folder)

    def _write(self, **fields: Any) -> None:
        atomic_write_json(self.folder / STATUS_FILE, {**self.recorded(), **fields})

    def __enter__(self) -> SweepJob:
        slurm = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        atomic_write_json(
            self.folder / STATUS_FILE,
            {
                "status": "running",
                "overrides": self.overrides,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "slurm_job_id": "_".join(filter(None, slurm)) or os.environ.get("SLURM_JOB_ID"),
            },
        )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        ended = time.strftime("%Y-%m-%d %H:%M:%S")
        if error is None or (isinstance(error, SystemExit) and error.code == 0):
            self._write(status="finished", ended=ended, val_score=self.val_score)
        else:
            self._write(status="failed", ended=ended, reason=_reason(error))


def read_status(folder: Path) -> dict[str, Any]:
    """A job folder's status file ({} when there is none or it cannot be read)."""
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


class SweepRecord(Callback):
    """Hydra callback: writes `<sweep dir>/sweep.json` when a multirun starts (config/hydra/output/job_folders.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        params = hydra_cfg.sweeper.get("params")
        record = {
            "config_name": hydra_cfg.job.config_name,
            "task_overrides": list(hydra_cfg.overrides.task),
            "hydra_overrides": [o for o in hydra_cfg.overrides.hydra if not o.startswith(LAUNCH_ONLY_OVERRIDES)],
            "sweeper": hydra_cfg.runtime.choices.get("hydra/sweeper"),
            "launcher": hydra_cfg.runtime.choices.get("hydra/launcher"),
            "params": OmegaConf.to_container(params) if params else {},
            "n_trials": hydra_cfg.sweeper.get("n_trials"),
            "launched": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_json(Path(str(hydra_cfg.sweep.dir)) / RECORD_FILE, record)
