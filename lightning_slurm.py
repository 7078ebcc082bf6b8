"""Under SLURM, the requeue signal ends a job at an optimizer step where every part of the state agrees, writes the
resume point there and requeues the job, which resumes from it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from utils.deferred import DeferredScalars
from utils.distributed import any_rank_flag

log = logging.getLogger(__name__)


#: The signal `#SBATCH --signal=SIGUSR1@90` sends before SLURM stops a job (time limit, preemption).
REQUEUE_SIGNAL = signal.SIGUSR1


class SlurmRequeue(Callback):
    """Under SLURM, the requeue signal saves the resume point at an optimizer step boundary, requeues the job and stops.

    Lightning's own handler (`SLURMEnvironment(auto_requeue=True)`, switched off by
    `lightning_callbacks.trainer_plugins`) saves `hpc_ckpt_N.ckpt` from inside the signal handler, wherever the step
    happens to be: after the optimizer step but before the progress counters, or with a gradient half accumulated, so
    the resumed run repeats or loses a batch. Here the handler only notes the signal; at the end of an optimizer step
    (at most `VOTE_LAG` + 1 steps later), where weights, optimizer, schedule, loop progress, sampler position and
    random state agree, every process writes `last.ckpt` (the file every other resume reads), rank 0 runs `scontrol
    requeue`, and training stops as on SIGTERM. In an epoch's last step the epoch's validation and its checkpoints
    (`last.ckpt` included) come first, and the job stops as the next epoch starts. The requeued job runs the same
    command in the same run folder and resumes from that file (`lightning_callbacks.resume_checkpoint`). The
    processes agree on the step: each optimizer step all-reduces whether any of them was signalled, and the host reads
    that vote `VOTE_LAG` steps later, when the GPU has long finished it, so the agreement never makes the host wait for
    the step being computed.

    The signal is acted on while training; one that arrives in the final test is not (the job then ends at its time
    limit, and rerunning the command re-tests from the final `last.ckpt`).

    Args:
        last: The resume checkpoint to write.
    """

    #: Optimizer steps between a vote and the decision it feeds: the save comes at most this many steps later.
    VOTE_LAG = 2

    def __init__(self, last: Path) -> None:
        self.last = last
        self.signalled = False
        self._previous: Any = None
        self._votes = DeferredScalars(self.VOTE_LAG)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(REQUEUE_SIGNAL, self._note)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        batch_idx = args[-1]
        if not ends_optimizer_step(trainer, batch_idx):
            return  # gradients still accumulating
        # Every process votes once per optimizer step and reads the votes in the same order: the same decision at the
        # same step everywhere.
        # torch's all-reduce (any_rank_flag) rather than Lightning's `strategy.reduce`, which puts a barrier first (a
        # host synchronisation); filled on the device, so no copy from pageable memory waits for the step either.
        signalled = torch.full((), float(self.signalled), device=trainer.strategy.root_device)
        self._votes.put(trainer.global_step, {"signalled": any_rank_flag(signalled)})
        if not any(vote["signalled"] for _, vote in self._votes.take()):
            return
        if ends_epoch(trainer, batch_idx):
            return  # the epoch's validation and checkpoints come next; the next epoch's start stops
        trainer.save_checkpoint(self.last)
        self._requeue_and_stop(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Signalled in an epoch's last step or its validation: the end of that epoch wrote last.ckpt (and the best
        # checkpoint), after this callback's hooks would have run.
        if trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            self._requeue_and_stop(trainer)

    def _requeue_and_stop(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            _requeue(slurm_job_id(), self.last)
        raise SIGTERMException()


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether training batch `batch_idx` ends an optimizer step: every `accumulate_grad_batches` batches of an epoch,
    and its last batch (Lightning's rule).
    """
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or ends_epoch(trainer, batch_idx)


def ends_epoch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether training batch `batch_idx` is its epoch's last.

    Lightning runs the epoch's validation after that batch; a checkpoint written before it would resume in the next
    epoch with that validation skipped (its loops count the epoch as done), so the resume point is written at the
    epoch's end instead.
    """
    return batch_idx + 1 >= trainer.num_training_batches


def slurm_job_id() -> str:
    """The id `scontrol requeue` takes: `<array job>_<task>` in a job array, else the job id."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _requeue(job_id: str, last: Path) -> None:
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    except OSError as error:
        log.error("Saved %s, but cannot requeue SLURM job %s (%s): resubmit the job to resume.", last, job_id, error)
        return
    if done.returncode:
        log.error(
            "Saved %s, but `scontrol requeue %s` failed (%s): resubmit the job to resume.",
            last,
            job_id,
            (done.stderr or done.stdout).strip() or f"status {done.returncode}",
        )
    else:
        log.warning("Requeue signal: saved %s and requeued SLURM job %s, which resumes from it.", last, job_id)
