"""Preempted jobs resume by themselves: step checkpoints, exact mid-epoch resume, the run folder, SLURM requeue.

Every expectation comes from a run that nothing interrupted: a resumed run must end with the same weights, bit for
bit (CPU, float32: the same operations on the same batches in the same order).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from data.samplers import IdentitySampler, ResumableSampler
from lightning_callbacks import WritePendingLogs, resume_checkpoint
from tests.conftest import CONFIG_DIR, compose_config, demo_overrides
from trainer import train
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Two epochs of 8 steps (of the 23 batches of 16 the fixture's captions make); last.ckpt every 3 steps and after each
# epoch: at 3, 6, 8, 9, 12, 15, 16.
STEPS_PER_EPOCH = 8
OVERRIDES = (
    "trainer.max_epochs=2",
    f"+trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "dataset.batch_size=16",
    "dataset.test_batch_size=512",
    "trainer.log_every_n_steps=1",
    "logger.checkpoint.every_n_train_steps=3",
)
STOP_AT = 13  # the crash: in epoch 1, after the step-12 checkpoint (4 of the epoch's 8 batches done)


def _config(demo_root: Path, workers: int, *extra: str):
    return compose_config("demo", demo_overrides(demo_root, *OVERRIDES, f"dataset.num_workers={workers}", *extra))


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _losses(run_dir: Path) -> dict[int, str]:
    """train/total_loss per logged step (the CSV text, so equality is exact), over every run in the folder."""
    losses = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open(newline="") as file:
            losses |= {
                int(row["step"]): row["train/total_loss"] for row in csv.DictReader(file) if row.get("train/total_loss")
            }
    return losses


def _assert_same_weights(resumed: Path, uninterrupted: Path) -> None:
    mine, reference = _state(resumed), _state(uninterrupted)
    assert mine["global_step"] == reference["global_step"]
    assert mine["state_dict"].keys() == reference["state_dict"].keys()
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(mine["state_dict"][k], v)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory):
    """Per worker count: (run folder, results) of the run nothing interrupts."""
    runs = {}

    def run(workers: int):
        if workers not in runs:
            run_dir = tmp_path_factory.mktemp(f"uninterrupted{workers}")
            runs[workers] = run_dir, train(_config(demo_root, workers), run_dir)
        return runs[workers]

    return run


class _Crash(Exception):
    pass


class _CrashAt(Callback):
    """Fail after optimizer step `step`, as a killed node would (the checkpoint callbacks run after this one)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_crashed_run_resumes_mid_epoch_in_its_folder_to_the_same_weights(
    demo_root, tmp_path, uninterrupted, workers, monkeypatch
):
    reference_dir, reference = uninterrupted(workers)
    run_dir = tmp_path / "run"
    # A killed process writes nothing more: only what was logged before the checkpoint survives with it.
    monkeypatch.setattr(WritePendingLogs, "on_exception", lambda *args: None)
    with pytest.raises(_Crash):
        train(_config(demo_root, workers), run_dir, callbacks=[_CrashAt(STOP_AT)])
    monkeypatch.undo()
    saved = _state(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 12 and saved["epoch"] == 1  # mid-epoch

    resumed = train(_config(demo_root, workers), run_dir)  # the same command in the same folder: no ckpt_path

    _assert_same_weights(run_dir / "checkpoints" / "last.ckpt", reference_dir / "checkpoints" / "last.ckpt")
    uninterrupted_losses, losses = _losses(reference_dir), _losses(run_dir)
    assert all(losses[step] == uninterrupted_losses[step] for step in range(12, 2 * STEPS_PER_EPOCH))
    # Every step is logged once over the two runs: the step-12 checkpoint was written after the logs of its steps.
    assert sorted(losses) == list(range(2 * STEPS_PER_EPOCH))
    assert resumed["val"] == reference["val"] and resumed["test_last"] == reference["test_last"]
    # Best-checkpoint selection went on in the same folder: the same epoch, the same file name, the same test.
    assert Path(resumed["best_checkpoint"]).name == Path(reference["best_checkpoint"]).name
    assert Path(resumed["best_checkpoint"]).parent == run_dir / "checkpoints"
    assert resumed["test"] == reference["test"]


# --- SLURM: the requeue signal -------------------------------------------------------------------------------------

JOB_ID = "4242"
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{record}"
"""


def _slurm_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment of a one-task SLURM job step, with `scontrol` replaced by a script that records its arguments."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(FAKE_SCONTROL.format(record=record))
    scontrol.chmod(0o755)
    env = {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "tbps",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    return env, record


class _SignalAt(Callback):
    """SLURM's `--signal=SIGUSR1@90`, sent to this process after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture
def restore_sigusr1():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize(
    ("signal_after", "saved_at", "validated"),
    [
        # The signal arrives in step 3 of 8, whose vote is read two steps later (SlurmRequeue.VOTE_LAG = 2, so that the
        # read never waits for the step in flight): saved at the end of step 5, mid-epoch.
        (2, 5, False),
        # In the epoch's last step: stopped after the epoch's validation and checkpoints, as epoch 1 starts.
        (7, 8, True),
    ],
)
def test_requeue_signal_saves_at_the_next_step_requeues_and_stops(
    demo_root, tmp_path, monkeypatch, restore_sigusr1, signal_after, saved_at, validated
):
    env, record = _slurm_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    overrides = (
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=8",
        "dataset.test_batch_size=512",
        "trainer.log_every_n_steps=1",
    )
    cfg = compose_config("demo", demo_overrides(demo_root, *overrides))
    with pytest.raises(SIGTERMException):  # trainer.py exits 143, as on SIGTERM
        train(cfg, tmp_path / "run", callbacks=[_SignalAt(signal_after)])
    assert record.read_text().split() == ["requeue", JOB_ID]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _state(checkpoints / "last.ckpt")["global_step"] == saved_at
    assert bool(list(checkpoints.glob("epoch00-*.ckpt"))) == validated
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue is off
    assert not (tmp_path / "run" / "results.json").exists()
    # Lightning labels the logs after optimizer step n as step n - 1: every step the checkpoint holds is logged.
    assert sorted(_losses(tmp_path / "run")) == list(range(saved_at))


def _trainer_command(demo_root: Path) -> list[str]:
    overrides = demo_overrides(
        demo_root, *OVERRIDES, "dataset.num_workers=2", "logger.checkpoint.every_n_train_steps=0"
    )
    return [sys.executable, str(ROOT / "trainer.py"), "-cn", "demo", *overrides]


@pytest.mark.slow
def test_sigusr1_to_a_slurm_job_requeues_it_and_the_requeued_job_ends_as_the_uninterrupted_run(
    demo_root, tmp_path, uninterrupted
):
    """trainer.py in a subprocess under a simulated SLURM job; the requeued job is the same command run again."""
    reference_dir, reference = uninterrupted(2)
    env, record = _slurm_env(tmp_path)
    env = {**os.environ, **env}
    run_dir = tmp_path / "outputs" / JOB_ID  # the default run folder of job 4242 (the command runs in tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    with (tmp_path / "first.txt").open("w") as log:
        process = subprocess.Popen(
            _trainer_command(demo_root),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while not last.is_file():  # epoch 0 is done: the signal lands in epoch 1 (or its first step)
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "first.txt").read_text()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)
        status = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    first_log = (tmp_path / "first.txt").read_text()
    assert status == 128 + signal.SIGTERM, first_log[-3000:]
    assert record.read_text().split() == ["requeue", JOB_ID]
    saved = _state(last)
    assert saved["epoch"] == 1 and STEPS_PER_EPOCH < saved["global_step"] < 2 * STEPS_PER_EPOCH, saved["global_step"]

    with (tmp_path / "requeued.txt").open("w") as log:
        done = subprocess.run(_trainer_command(demo_root), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    requeued_log = (tmp_path / "requeued.txt").read_text()
    assert done.returncode == 0, requeued_log[-3000:]
    assert f"Resuming from {last}" in requeued_log
    _assert_same_weights(last, reference_dir / "checkpoints" / "last.ckpt")
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"]
    assert Path(resumed["best_checkpoint"]).name == Path(reference["best_checkpoint"]).name


# --- The run folder -------------------------------------------------------------------------------------------------


def _run_dir(monkeypatch, job_id: str | None) -> str:
    if job_id is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="demo", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${now:...} as a run does
    return cfg.hydra.run.dir


def test_run_folder_is_the_slurm_job_id_under_slurm_and_the_time_otherwise(monkeypatch):
    assert _run_dir(monkeypatch, JOB_ID) == f"outputs/{JOB_ID}"
    local = _run_dir(monkeypatch, None)
    assert time.strptime(local, "outputs/%Y-%m-%d/%H-%M-%S"), local


def test_a_run_folder_holding_another_configurations_checkpoint_is_refused(demo_root, tmp_path):
    cfg = _config(demo_root, 0)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    other = {**OmegaConf.to_container(cfg, resolve=True), "seed": 7}
    other["trainer"] = {**other["trainer"], "max_epochs": 9}
    torch.save({"hyper_parameters": {"cfg": other}}, last)
    with pytest.raises(ConfigError, match=r"another configuration \(seed, trainer.max_epochs differ\)"):
        train(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["last.ckpt"]  # nothing written


def test_a_run_folder_of_the_same_run_with_other_speed_settings_resumes(demo_root, tmp_path):
    """A checkpoint saved before `backbone.half_precision_frozen_weights` existed, compiled and checkpointed: the
    same run (those settings change speed and memory only), so the run folder's last.ckpt is its resume point.
    """
    cfg = _config(demo_root, 0)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    older = OmegaConf.to_container(cfg, resolve=True)
    backbone = {k: v for k, v in older["backbone"].items() if k != "half_precision_frozen_weights"}
    older["backbone"] = backbone | {"compile": True, "gradient_checkpointing": True}
    torch.save({"hyper_parameters": {"cfg": older}}, last)
    assert resume_checkpoint(cfg, tmp_path) == str(last)


# --- The sampler: where an epoch restarts --------------------------------------------------------------------------


def test_resumed_sampler_yields_the_rest_of_the_epoch_with_its_repeat_tags():
    pids = [i // 3 for i in range(40)] + [100, 101]  # two identities with one sample: padded, drawn K times
    image_ids = list(range(42))
    batch = 8

    def sampler():
        return ResumableSampler(IdentitySampler(pids, image_ids, batch, 4, seed=3), batch)

    full = sampler()
    full.set_epoch(2)
    epoch2 = list(full)
    full.set_epoch(3)
    epoch3 = list(full)
    assert epoch2 != epoch3 and any(repeat for _, _, repeat in epoch2)

    resumed = sampler()
    resumed.resume_at(2, 3)
    assert len(resumed) == len(epoch2)  # Lightning counts the resumed epoch's batches from where it stopped
    assert list(resumed) == epoch2[3 * batch :]
    assert list(resumed) == epoch2[3 * batch :]  # iterating again (Lightning may) starts at the same place
    resumed.set_epoch(3)
    assert list(resumed) == epoch3


def test_training_loader_is_resumable_the_way_lightning_restores_loaders(demo_root):
    """Lightning saves a loader's `state_dict()` with its loops and calls `load_state_dict` before iterating it."""
    from lightning.fabric.utilities.types import _Stateful

    from lightning_data import build_datamodule

    cfg = compose_config("demo", demo_overrides(demo_root, "dataset.batch_size=16"))

    def epoch_items(position: dict[str, int] | None = None) -> list[list[tuple[int, int]]]:
        """Per batch, (dataset index, augmentation seed) of each item: the seed tells repeats apart."""
        loader = build_datamodule(cfg).train_dataloader()
        assert isinstance(loader, _Stateful)  # so Lightning does not warn that the loader cannot resume mid-epoch
        if position is None:
            loader.sampler.set_epoch(1)
        else:
            loader.load_state_dict(position)
        return [list(zip(batch["index"].tolist(), batch["sample_seeds"].tolist())) for batch in loader]

    uninterrupted = epoch_items()
    assert epoch_items({"epoch": 1, "batches_done": 5}) == uninterrupted[5:]


def _vote_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lightning_slurm import SlurmRequeue
    from utils.deferred import DeferredScalars
    from utils.distributed import any_rank_flag

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # SlurmRequeue's vote: each step all-reduces whether this process was signalled, read VOTE_LAG steps later.
        votes = DeferredScalars(SlurmRequeue.VOTE_LAG)
        signalled = [False, rank == 1, False, True]  # only rank 1 gets the signal in step 2; both in step 4
        for step, flag in enumerate(signalled):
            votes.put(step, {"signalled": any_rank_flag(torch.tensor(flag))})
        reads = [bool(vote["signalled"]) for _, vote in votes.take(everything=True)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(reads))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import the whole project: about 20 s on 2 cores
def test_the_requeue_vote_is_the_same_on_every_process_when_any_was_signalled(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_vote_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True, False, True]
