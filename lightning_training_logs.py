"""A training step's metrics reach the loggers without making the host wait for the GPU, and a non-finite loss stops
the run at the next point that reads the device anyway.

Reading a GPU value on the host waits for every kernel queued before it, and the recipes log every optimizer step.
`TrainingLogs` (mixed into `TBPSLitModule`) therefore queues each logged step's metrics with `DeferredScalars` and
writes them `LOG_LAG` logged steps later under the step Lightning's own `self.log` would label them with; the flag of a
non-finite loss travels with them.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from lightning_slurm import ends_optimizer_step
from utils.deferred import DeferredScalars
from utils.distributed import all_gather_objects, any_rank_flag, rank, world_size

#: Logged training steps whose values are still on their way from the GPU when a step is logged (`DeferredScalars`):
#: the host may queue this many steps ahead of the last values it has read.
LOG_LAG = 2
#: The entry of a logged step's values that says whether any rank's loss was non-finite up to that step.
_NON_FINITE = "non_finite"


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; raised at the next check, always before a checkpoint is written."""


def logs_after_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning writes the logs after this training batch: the batch ended an optimizer step, and the step
    count is a multiple of `trainer.log_every_n_steps`, or training is stopping (`trainer.should_stop`, e.g. early
    stopping held back by `min_epochs`), or under `fast_dev_run` (Lightning's own rule).

    Writing the logs reads every logged value from the GPU, which waits for the queued kernels (a host
    synchronisation); anything else that must read the device (a non-finite check, the progress bar's losses) is
    cheapest there. Under gradient accumulation the batches that only accumulate never log.
    """
    if not ends_optimizer_step(trainer, batch_idx):  # gradients still accumulating
        return False
    if trainer.fast_dev_run:
        return True
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step % every == 0 or trainer.should_stop)


class TrainingLogs:
    """The training-log and non-finite-loss half of `TBPSLitModule` (a mixin of a `LightningModule`).

    `record_step` (from `training_step`) keeps the step's metrics on the device; the module's batch-end hook calls
    `_queue_step_logs` and `write_training_logs`; `settle_training_logs` writes everything held back and checks the
    losses before anything that must not see non-finite weights (a validation, a checkpoint, an epoch's end).
    """

    def _init_training_logs(self) -> None:
        # Device-side record of a non-finite training loss (see _flag_if_not_finite).
        self._non_finite: Tensor | None = None
        self._non_finite_step = self._non_finite_terms = None
        self._term_names: list[str] = []
        #: This step's training metrics on the device (record_step), queued for the loggers when the batch logs, and
        #: the batch they come from while they are not queued yet.
        self._step_logs: dict[str, Tensor] = {}
        self._unqueued_batch: int | None = None
        self._pending_logs = DeferredScalars(LOG_LAG)
        #: The training metrics of the last logged step written to the loggers (what the progress bar shows).
        self.logged_training_metrics: dict[str, float] = {}

    def record_step(self, batch_idx: int, total: Tensor, terms: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
        """Keep batch `batch_idx`'s total loss, loss terms and statistics on the device for the loggers, and flag a
        non-finite loss, without reading anything back.
        """
        self._flag_if_not_finite(total, terms)
        # Not self.log: Lightning converts logged values to floats when it writes them, a host synchronisation at
        # every logged step (every step in the recipes); the batch-end hook queues them for a later, free read.
        self._step_logs = {
            "train/total_loss": total.detach(),
            **{f"train/{name}": value.detach() for name, value in terms.items()},
            **{f"train/{name}": value.detach() for name, value in stats.items()},
        }
        self._unqueued_batch = batch_idx

    def _flag_if_not_finite(self, total: Tensor, terms: dict[str, Tensor]) -> None:
        """Record on the device whether this step's loss is NaN/inf, and the first such step's losses.

        No host synchronisation here (it would stall the GPU on every step): the flag travels with the logged values
        (`write_training_logs` reads it `LOG_LAG` logged steps later), and `settle_training_logs` reads it before a
        validation, a checkpoint and an epoch's end.
        """
        bad = ~torch.isfinite(total.detach())
        if self._non_finite is None:
            self._non_finite = torch.zeros((), dtype=torch.bool, device=total.device)
            self._non_finite_step = torch.zeros((), dtype=torch.long, device=total.device)
            self._non_finite_terms = torch.zeros(len(terms), device=total.device)
        first = bad & ~self._non_finite
        values = torch.stack([value.detach().float() for value in terms.values()])
        self._non_finite_step = torch.where(first, self.global_step, self._non_finite_step)
        self._non_finite_terms = torch.where(first, values, self._non_finite_terms)
        self._non_finite |= bad
        self._term_names = list(terms)

    def check_finite(self) -> None:
        """Stop if a training loss became NaN/inf since the last check; every rank takes the same decision and names
        the same step: the earliest any rank saw, with that rank's loss terms then.

        One host synchronisation (plus one all-gather of each rank's first bad step under DDP).
        """
        flag = getattr(self, "_non_finite", None)  # None until a training step ran (or for a bare hook call)
        mine = None
        if flag is not None and bool(flag):
            mine = (int(self._non_finite_step), rank(), dict(zip(self._term_names, self._non_finite_terms.tolist())))
        reports = [report for report in all_gather_objects(mine) if report is not None]
        if not reports:
            return
        step, bad_rank, terms = min(reports, key=lambda report: report[:2])
        on_rank = f" on rank {bad_rank}" if world_size() > 1 else ""
        values = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
        raise NonFiniteLossError(
            f"non-finite training loss at global step {step}{on_rank} (detected at step {self.global_step}, epoch "
            f"{self.current_epoch}): {values}. Lower optimizer.lr or loss.circle_gamma, raise loss.circle_margin, or "
            "train in bf16-mixed/32-true instead of 16-mixed. Checkpoints are checked before they are written: the "
            "last one holds finite weights."
        )

    def _queue_step_logs(self) -> None:
        """Queue the current batch's training metrics for the loggers, once, if Lightning logs after this batch."""
        batch_idx, self._unqueued_batch = self._unqueued_batch, None
        if batch_idx is None or not logs_after_batch(self.trainer, batch_idx):
            return
        # Lightning's label for the logs written after this batch: optimizer steps before this one.
        key = (self.global_step - 1, self.current_epoch)
        flag = self._non_finite if self._non_finite is not None else torch.zeros((), device=self.device)
        self._pending_logs.put(key, {**self._step_logs, _NON_FINITE: any_rank_flag(flag)})

    def write_training_logs(self, *, everything: bool = False) -> None:
        """Write the queued training metrics that are `LOG_LAG` logged steps old (all of them with `everything`)
        to the loggers, under the step they were computed at; stop there if a loss up to that step was non-finite.

        Every rank releases the same entries at the same batch (`DeferredScalars`) with the same all-reduced flag, so
        all of them stop together.
        """
        for (step, epoch), values in self._pending_logs.take(everything=everything):
            non_finite = values.pop(_NON_FINITE)
            for logger in self.loggers:
                logger.log_metrics({**values, "epoch": epoch}, step=step)
                logger.save()  # as Lightning does after each logged step: the CSV file grows as training goes
            self.logged_training_metrics = values
            if non_finite:
                self._pending_logs.clear()
                self.check_finite()

    def settle_training_logs(self) -> None:
        """Write every held-back training log (the current batch's too, when a callback of this batch writes a
        checkpoint) and stop on a non-finite loss: before a validation, a checkpoint and an epoch's end.
        """
        self._queue_step_logs()
        self.write_training_logs(everything=True)
        self.check_finite()
