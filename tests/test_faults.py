"""Faults: a killed run resumes to the same result; writes are atomic; fp16 losses stay finite.

The SIGTERM / SIGINT tests run `trainer.py` for real in a subprocess, twice (about a minute and a half with the
uninterrupted run): marked slow, so CI runs them; the default run keeps `test_requeue`'s crashed-run resume.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from model.features import TrainFeatures
from model.objective import Objective
from model.strategies import STRATEGIES, LossSettings, StepContext
from tests.conftest import compose_config, demo_overrides
from utils.io import atomic_write, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300  # one trainer.py run takes about 20 s on 2 idle cores


# --- Killing training (SIGTERM from a scheduler, Ctrl-C) and resuming ------------------------------------------------

# Three epochs of 23 steps: a checkpoint after the first, the interruption early in the second (mid-epoch).
RUN_OVERRIDES = (
    "trainer.max_epochs=3",
    "dataset.batch_size=16",
    "dataset.test_batch_size=512",
    "trainer.log_every_n_steps=1",  # the CSV logger then appends a row per step: the test's view of progress
    "dataset.num_workers=2",  # the demo's default: augmentation runs in worker processes
    # Select the LOWEST validation score: the selected epoch is then (almost surely) epoch 0, before the interruption,
    # which a resumed run only reports right if best-checkpoint tracking survives the resume.
    "logger.checkpoint.mode=min",
)


def _trainer_command(demo_root: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = demo_overrides(demo_root, *RUN_OVERRIDES, *extra)
    return [sys.executable, "trainer.py", "-cn", "demo", *overrides, f"hydra.run.dir={run_dir}"]


@contextlib.contextmanager
def _sigint_inherited_as_default():
    """Let the child see SIGINT's default disposition even when pytest runs as a background job (`pytest &`).

    A shell starts background jobs with SIGINT ignored, an ignored signal stays ignored across exec, and Python then
    installs no KeyboardInterrupt handler: the child would never notice Ctrl-C. A handler (unlike SIG_IGN) is reset
    to the default by exec.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(process: subprocess.Popen) -> None:
    """Kill a child (and its session: data-loader workers) that is still running; never leave an orphan."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _train_rows(run_dir: Path) -> list[dict[str, str]]:
    """Training rows of the CSV log written so far (tolerates a file that is being appended to or rewritten)."""
    rows = []
    for path in run_dir.glob("csv/version_*/metrics.csv"):
        with contextlib.suppress(OSError, csv.Error), path.open(newline="") as file:
            rows += [row for row in csv.DictReader(file) if row.get("train/total_loss") and row.get("epoch")]
    return rows


def _in_second_epoch(run_dir: Path) -> bool:
    """Epoch 0 is checkpointed (last.ckpt) and epoch 1 has logged a training step."""
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return False
    return any(int(float(row["epoch"])) >= 1 for row in _train_rows(run_dir))


def _tail(path: Path, characters: int = 3000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.is_file() else "(no log)"


def _run(command: list[str], log_path: Path) -> int:
    with log_path.open("w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    return done.returncode


def _run_and_interrupt(command: list[str], run_dir: Path, log_path: Path, signum: int) -> int:
    """Start `command`, send `signum` once the second epoch has begun, return the exit status."""
    with log_path.open("w") as log, _sigint_inherited_as_default():
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _in_second_epoch(run_dir):
            if process.poll() is not None:
                pytest.fail(f"the run ended (status {process.returncode}) before epoch 1 began:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"epoch 1 did not begin within {RUN_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(0.05)
        process.send_signal(signum)
        return process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        _stop(process)


def _epoch_of(checkpoint: str) -> int:
    """Epoch of a best-checkpoint name such as `epoch01-val_score29.37.ckpt`."""
    return int(re.search(r"epoch(\d+)-", Path(checkpoint).name).group(1))


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory) -> dict:
    """results.json of the run that nothing interrupts, shared by the SIGTERM and SIGINT variants."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    status = _run(_trainer_command(demo_root, run_dir), run_dir.parent / "log.txt")
    assert status == 0, _tail(run_dir.parent / "log.txt")
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize(
    ("signum", "expected_status"),
    [
        # trainer.py turns Lightning's clean SIGTERM stop into 143.
        pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
        # Lightning catches KeyboardInterrupt, shuts down and exits 1.
        pytest.param(signal.SIGINT, 1, id="SIGINT", marks=pytest.mark.slow),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_result(demo_root, tmp_path, uninterrupted, signum, expected_status):
    killed_dir = tmp_path / "killed"
    status = _run_and_interrupt(_trainer_command(demo_root, killed_dir), killed_dir, tmp_path / "killed.txt", signum)
    log = (tmp_path / "killed.txt").read_text(errors="replace")
    assert status == expected_status, log[-3000:]
    assert not (killed_dir / "results.json").exists(), "an interrupted run must not write results"

    # Every checkpoint on disk is complete: it loads as plain tensors and containers.
    checkpoints = sorted((killed_dir / "checkpoints").iterdir())
    assert checkpoints and all(path.suffix == ".ckpt" for path in checkpoints), checkpoints  # no temporary files
    for path in checkpoints:
        torch.load(path, weights_only=True, map_location="cpu")
    last = killed_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")

    # The hint names the checkpoint, and the run stopped mid-epoch after it: the resumed run must redo those steps.
    assert f"ckpt_path={last}" in log, log[-3000:]
    stopped = re.search(r"Training stopped at epoch (\d+), step (\d+)", log)
    assert stopped, log[-3000:]
    steps_per_epoch = saved["global_step"] // (saved["epoch"] + 1)
    assert saved["global_step"] < int(stopped.group(2)) < saved["global_step"] + steps_per_epoch, stopped.group(0)

    resumed_dir = tmp_path / "resumed"
    status = _run(_trainer_command(demo_root, resumed_dir, f"ckpt_path={last}"), tmp_path / "resumed.txt")
    assert status == 0, _tail(tmp_path / "resumed.txt")
    resumed = json.loads((resumed_dir / "results.json").read_text())
    # Same final weights: the last validation and the last-epoch test are identical.
    assert resumed["val"] == uninterrupted["val"]
    assert resumed["test_last"] == uninterrupted["test_last"]
    assert resumed["chance_t2i_R1"] == uninterrupted["chance_t2i_R1"]
    # The same epoch is selected, wherever it lies, and its test table is the uninterrupted run's.
    assert _epoch_of(resumed["best_checkpoint"]) == _epoch_of(uninterrupted["best_checkpoint"])
    assert resumed["test"] == uninterrupted["test"]
    assert Path(resumed["best_checkpoint"]).parent == killed_dir / "checkpoints"


# --- Atomic writes ----------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [_Interrupted, KeyboardInterrupt])
def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, error):
    path = atomic_write_text(tmp_path / "results.json", '{"old": true}\n')

    def write_half_then_fail(file):
        file.write(b'{"new": [1, 2, ')  # a serialiser that streams, then fails midway
        raise error

    with pytest.raises(error):
        atomic_write(path, write_half_then_fail)
    assert path.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_failing_json_serialiser_keeps_the_previous_file(tmp_path):
    path = atomic_write_json(tmp_path / "results.json", {"R1": 1.0})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"R1": 2.0, "not json": object()})
    assert json.loads(path.read_text()) == {"R1": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time
    from utils.io import atomic_write

    def write(file):
        file.write(b"partial")
        file.flush()
        print("written", flush=True)
        time.sleep(60)  # killed here

    atomic_write(sys.argv[1], write)
    """
)


def test_hard_kill_mid_write_never_leaves_a_truncated_file(tmp_path):
    """SIGKILL cannot be caught: the target must still be the previous, complete file."""
    path = atomic_write_text(tmp_path / "results.json", "complete\n")
    process = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "written"
        process.kill()
        process.wait(timeout=30)
    finally:
        _stop(process)
    assert path.read_text() == "complete\n"
    assert [p.name for p in tmp_path.glob(".results.json.*.tmp")]  # the stray temporary file holds the partial write


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a results.json the group can read, as any file the user creates."""
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    written = atomic_write_text(tmp_path / "results.json", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_streamed_torch_save_loads_with_weights_only(tmp_path):
    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3}
    path = atomic_write(tmp_path / "last.ckpt", lambda file: torch.save(state, file))
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


# --- fp16 features with Circle gamma 256 ------------------------------------------------------------------------

# tests/test_strategies.py runs `auxiliary_cross` with the model under autocast; here every strategy and both circle
# reductions get float16 features directly, including the collapsed case (every similarity near 1), where
# exp(gamma * (1 + m) * (1 - m)) = exp(240) overflows even float32 unless the loss stays in log space.

PIDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])


def _fp16_features(geometry: str, dim: int = 16, num_classes: int = 5, vocab: int = 11) -> TrainFeatures:
    g = torch.Generator().manual_seed(0)
    batch = len(PIDS)

    def unit() -> torch.Tensor:
        if geometry == "collapsed":  # all features (nearly) the same: positives and negatives at s ~ 1
            x = torch.ones(batch, dim) + 1e-3 * torch.randn(batch, dim, generator=g)
        else:
            x = torch.randn(batch, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=-1).half().requires_grad_(True)

    def logits(*shape: int) -> torch.Tensor:
        return (30 * torch.randn(*shape, generator=g)).half().requires_grad_(True)

    labels = torch.full((batch, 6), -100)
    labels[:, 2] = torch.randint(0, vocab, (batch,), generator=g)
    return TrainFeatures(
        image_feats=unit(),
        text_feats=unit(),
        pids=PIDS,
        logit_scale=torch.tensor(100.0, dtype=torch.float16),
        logit_bias=torch.tensor(-10.0, dtype=torch.float16),
        aug_image_feats=unit(),
        ss_feats_a=unit(),
        ss_feats_b=unit(),
        id_logits_image=logits(batch, num_classes),
        id_logits_text=logits(batch, num_classes),
        mlm_logits=logits(batch, 6, vocab),
        mlm_labels=labels,
        raw_image_feats=logits(batch, dim),
        raw_text_feats=logits(batch, dim),
    )


@pytest.mark.parametrize("geometry", ["random", "collapsed"])
@pytest.mark.parametrize("reduction", ["global", "per_anchor"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fp16_features_with_gamma_256_give_finite_losses_and_gradients(strategy, reduction, geometry):
    settings = LossSettings(
        strategy=strategy,
        circle_gamma=256.0,
        circle_reduction=reduction,
        **{flag: True for flag in ("SS", "CITC", "RITC", "ITC", "SDM", "CMPM", "ID", "MLM")},
    )
    feats = _fp16_features(geometry)
    terms = Objective(settings)(feats, StepContext(epoch=2.0))
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
    sum(terms.values()).backward()
    leaves = [value for value in vars(feats).values() if isinstance(value, torch.Tensor) and value.requires_grad]
    assert all(leaf.grad is not None and leaf.grad.dtype == torch.float16 for leaf in leaves)
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves), [torch.isfinite(x.grad).all() for x in leaves]


def test_checkpoints_are_renamed_into_place_when_tmpdir_is_another_file_system(demo_root, tmp_path, monkeypatch):
    """Clusters keep $TMPDIR node-local and checkpoints on shared storage: a rename across them is a copy."""
    import builtins
    import shutil
    import tempfile

    from trainer import train

    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a temporary folder on a file system other than the run folder's")
    staging = Path(tempfile.mkdtemp(dir=other))
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    written_in_place, real_open = [], builtins.open

    def spying_open(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and str(file).endswith(".ckpt") and set(mode) & set("wax+"):
            written_in_place.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    overrides = demo_overrides(
        demo_root, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "dataset.test_batch_size=512"
    )
    try:
        train(compose_config("demo", overrides), tmp_path)
    finally:
        shutil.rmtree(staging)
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert not written_in_place, f"checkpoints written in place (a crash leaves them truncated): {written_in_place}"
