"""A training run reads values back from the device only after batches that Lightning logs (and at epoch ends), and
writes the same log rows as Lightning's own `self.log` would.

On a GPU every such read (`.item()`, `float()`, `bool()`, `.tolist()`) waits for all queued kernels: one per batch
keeps the host from queueing the next batch while the GPU computes. The expected batches come from the definition of
Lightning's cadence, not from the code: an optimizer step ends every `accumulate_grad_batches` batches and at an
epoch's last batch, and the logs are written when the step count is a multiple of `log_every_n_steps`. The expected
rows (which step label and epoch carry which batch's values) come from Lightning itself, logging on the same cadence.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_models import TBPSLitModule
from tests.conftest import compose_config, demo_overrides
from trainer import train

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


class _ReadsPerBatch(Callback):
    """Counts the host's reads of tensor values, per training batch (epoch, index); the data workers' are their own."""

    def __init__(self) -> None:
        self.current: tuple[int, int] | None = None
        self.reads: dict[tuple[int, int], int] = {}
        self.batches_per_epoch: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.current = (trainer.current_epoch, batch_idx)
        self.batches_per_epoch = trainer.num_training_batches

    def on_train_epoch_end(self, trainer, pl_module):
        self.current = None  # validation, checkpoints and the epoch's own checks follow

    def on_train_end(self, trainer, pl_module):
        bar = trainer.progress_bar_callback
        self.shown = bar.get_metrics(trainer, pl_module) if bar is not None and bar.is_enabled else None

    def count(self) -> None:
        if self.current is not None:
            self.reads[self.current] = self.reads.get(self.current, 0) + 1


def _logging_batches(epochs: int, batches: int, accumulate: int, log_every: int) -> set[tuple[int, int]]:
    steps, logged = 0, set()
    for epoch in range(epochs):
        for index in range(batches):
            if (index + 1) % accumulate == 0 or index == batches - 1:
                steps += 1
                if steps % log_every == 0:
                    logged.add((epoch, index))
    return logged


class _LightningsOwnLog(L.LightningModule):
    """Logs with Lightning's own `self.log` which batch each row comes from (the reference for the rows' labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.log("batch", float(batch_idx))
        return (self.weight * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _csv_rows(folder: Path, column: str) -> list[dict[str, str]]:
    rows = []
    for path in sorted(folder.rglob("metrics.csv")):
        with path.open(newline="") as file:
            rows += [row for row in csv.DictReader(file) if row.get(column)]
    return rows


def _lightnings_rows(folder: Path, epochs: int, batches: int, accumulate: int, log_every: int) -> dict[int, tuple]:
    """Step label -> (epoch, batch index) of the rows Lightning's `self.log` writes on this cadence."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every,
        logger=CSVLogger(folder),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_LightningsOwnLog(), torch.utils.data.DataLoader(torch.ones(batches, 1), batch_size=1))
    return {int(row["step"]): (int(row["epoch"]), int(float(row["batch"]))) for row in _csv_rows(folder, "batch")}


def test_training_reads_the_device_only_after_logged_batches_and_at_epoch_ends(demo_root, tmp_path, monkeypatch):
    recorder = _ReadsPerBatch()
    losses = {}  # (epoch, batch index) -> the total loss training_step returned
    step = TBPSLitModule.training_step

    def recorded(module, batch, batch_idx):
        loss = step(module, batch, batch_idx)
        losses[module.current_epoch, batch_idx] = loss.detach().clone()
        return loss

    monkeypatch.setattr(TBPSLitModule, "training_step", recorded)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            recorder.count()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    epochs, accumulate, log_every = 2, 2, 3
    overrides = (
        f"trainer.max_epochs={epochs}",
        "dataset.batch_size=16",
        f"++trainer.accumulate_grad_batches={accumulate}",
        f"trainer.log_every_n_steps={log_every}",
        "++trainer.enable_progress_bar=true",  # as users run: the bar must not read either
        "optimizer.fused=true",  # the CUDA default; the loop AdamW reads its CPU step counters
        "dataset.num_workers=1",  # augmentation reads CPU tensors: in a worker, not counted here
    )
    train(compose_config("demo", demo_overrides(demo_root, *overrides)), tmp_path / "run", callbacks=[recorder])
    monkeypatch.undo()

    batches = recorder.batches_per_epoch
    assert batches >= 6  # several optimizer steps per epoch, not all of them logged
    logged = _logging_batches(epochs, batches, accumulate, log_every)
    assert 0 < len(logged) < epochs * batches // accumulate
    read_in = set(recorder.reads)
    assert read_in <= logged, f"reads after batches that do not log: {sorted(read_in - logged)}"
    assert read_in, "the logged batches read the losses (the logger, the non-finite check)"
    assert isinstance(recorder.shown["loss"], float)  # the bar still shows the loss, that of the last logged step

    # The rows: one per step Lightning's self.log writes, with its step label and epoch, holding that step's loss.
    expected = _lightnings_rows(tmp_path / "lightning", epochs, batches, accumulate, log_every)
    assert {batch for batch in expected.values()} == logged
    rows = _csv_rows(tmp_path / "run", "train/total_loss")
    assert sorted(int(row["step"]) for row in rows) == sorted(expected)
    for row in rows:
        epoch, batch_idx = expected[int(row["step"])]
        assert int(row["epoch"]) == epoch
        assert float(row["train/total_loss"]) == pytest.approx(float(losses[epoch, batch_idx]), rel=1e-6)


class _CountReads:
    """Counts the host's reads of tensor values inside the block."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("architecture", ["siglip", "clip"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_text_masks_are_built_without_a_read_and_mask_as_transformers_does(
    tiny_checkpoint, tiny_clip_checkpoint, monkeypatch, architecture, attention
):
    from transformers import AutoModel

    from model.tbps import TBPS

    path = tiny_checkpoint if architecture == "siglip" else tiny_clip_checkpoint
    backbone = AutoModel.from_pretrained(path, attn_implementation=attention).eval()
    model = TBPS(backbone).eval()
    ids = torch.randint(3, 150, (4, 16), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[0, 9:] = padded[2, 5:] = 0
    with torch.no_grad():
        for mask in (padded, torch.ones_like(ids)):
            expected = backbone.get_text_features(input_ids=ids, attention_mask=mask).pooler_output  # transformers' own
            reads = _CountReads(monkeypatch)
            got = model.text_embeddings(ids, mask)
            monkeypatch.undo()
            assert reads.count == 0
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        unmasked = backbone.get_text_features(input_ids=ids).pooler_output
    if architecture == "siglip":  # pools the last position, which attends to the masked ones (CLIP's causal pooling
        # position may precede them): the mask must change it
        assert not torch.allclose(model.text_embeddings(ids, padded)[0], unmasked[0], atol=1e-4)


def test_fast_dev_run_shows_the_loss_of_every_step(demo_root, tmp_path):
    recorder = _ReadsPerBatch()
    overrides = ("+trainer.fast_dev_run=true", "++trainer.enable_progress_bar=true", "trainer.log_every_n_steps=50")
    train(compose_config("demo", demo_overrides(demo_root, *overrides)), tmp_path, callbacks=[recorder])
    assert isinstance(recorder.shown["loss"], float)  # Lightning logs every step of a fast_dev_run


@pytest.mark.parametrize(
    ("batch_and_step", "log_every", "should_stop", "fast_dev_run", "expected"),
    [
        ((0, 4), 2, False, False, False),  # accumulating (batch 1 of 2): no optimizer step, never logs
        ((1, 5), 5, False, False, True),
        ((1, 6), 5, False, False, False),
        ((1, 6), 5, True, False, True),  # stopping (early stopping held back by min_epochs): every step logs
        ((1, 6), 0, True, False, False),  # log_every_n_steps=0: never
        ((1, 6), 0, False, True, True),  # fast_dev_run logs every step whatever log_every_n_steps says
    ],
)
def test_logs_after_batch_follows_lightnings_rule(batch_and_step, log_every, should_stop, fast_dev_run, expected):
    from types import SimpleNamespace

    from lightning_training_logs import logs_after_batch

    batch_idx, step = batch_and_step  # two batches per optimizer step, ten per epoch
    trainer = SimpleNamespace(
        global_step=step,
        accumulate_grad_batches=2,
        num_training_batches=10,
        log_every_n_steps=log_every,
        should_stop=should_stop,
        fast_dev_run=fast_dev_run,
    )
    assert logs_after_batch(trainer, batch_idx) is expected
