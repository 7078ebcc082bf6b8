"""Faults: a killed run resumes to the same result; writes are atomic; fp16 losses stay finite; nothing unpickles code.

The SIGTERM / SIGINT tests run `trainer.py` for real in a subprocess and are marked slow (about a minute together).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
import pickle
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
import yaml

from model.strategies import STRATEGIES, LossSettings, Objective, StepContext, TrainFeatures
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "expected_status"),
    [
        (signal.SIGTERM, 128 + signal.SIGTERM),  # trainer.py turns Lightning's clean SIGTERM stop into 143
        (signal.SIGINT, 1),  # Lightning catches KeyboardInterrupt, shuts down and exits 1
    ],
    ids=["SIGTERM", "SIGINT"],
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
    # The "best" checkpoint is chosen among the epochs each folder saw: Lightning restores best-tracking only when the
    # resumed run writes to the same checkpoint folder, so epochs before the resume point are unknown to this one.
    first_resumed_epoch = saved["epoch"] + 1
    if _epoch_of(uninterrupted["best_checkpoint"]) >= first_resumed_epoch:
        assert _epoch_of(resumed["best_checkpoint"]) == _epoch_of(uninterrupted["best_checkpoint"])
        assert resumed["test"] == uninterrupted["test"]
    else:
        assert _epoch_of(resumed["best_checkpoint"]) >= first_resumed_epoch


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


def _index_manifest(root: Path, count: int) -> dict:
    files = [{"path": f"{i}.jpg", "size": 1, "mtime_ns": 0} for i in range(count)]
    return {"embed_dim": 4, "image_root": str(root), "files": files, "model": {"files": []}}


def test_interrupted_index_update_keeps_the_previous_index(tmp_path, monkeypatch):
    from search_app.index import SearchIndex, _commit

    index_dir = tmp_path / "index"
    _commit(index_dir, _index_manifest(tmp_path, 2), torch.ones(2, 4))
    real_replace = os.replace

    def crash_on_manifest(source, target):
        if Path(target).name == "manifest.json":
            raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        _commit(index_dir, _index_manifest(tmp_path, 3), torch.zeros(3, 4))
    monkeypatch.undo()
    index = SearchIndex.load(index_dir)
    assert len(index.entries) == 2 and torch.equal(index.embeddings, torch.ones(2, 4))
    assert not list(index_dir.glob("*.tmp"))


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
    )


@pytest.mark.parametrize("geometry", ["random", "collapsed"])
@pytest.mark.parametrize("reduction", ["global", "per_anchor"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fp16_features_with_gamma_256_give_finite_losses_and_gradients(strategy, reduction, geometry):
    settings = LossSettings(
        strategy=strategy,
        CIR=True,
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


# --- No eval/exec of configuration text, no unpickling -------------------------------------------------------------

SKIPPED_FOLDERS = {"tests", "outputs", "multirun", "wandb", "demo_assets", "__pycache__", "node_modules"}
#: (path, call) pairs reviewed and allowed, with the reason.
ALLOWED = {
    # `optimizer.type` selects an entry of the fixed OPTIMIZERS table; config text never reaches import_module.
    ("solver/build.py", "importlib.import_module"),
}
ALWAYS_UNSAFE = {
    "eval": "eval() of text",
    "exec": "exec() of text",
    "compile": "compile() of text",
    "__import__": "import by name from text",
    "importlib.import_module": "import by name from text",
    "pickle.load": "unpickling runs code",
    "pickle.loads": "unpickling runs code",
    "pickle.Unpickler": "unpickling runs code",
    "dill.load": "unpickling runs code",
    "dill.loads": "unpickling runs code",
    "cloudpickle.load": "unpickling runs code",
    "cloudpickle.loads": "unpickling runs code",
    "joblib.load": "unpickling runs code",
    "marshal.load": "unmarshalling code objects",
    "marshal.loads": "unmarshalling code objects",
    "shelve.open": "shelve unpickles",
    "pandas.read_pickle": "unpickling runs code",
    "torch.hub.load": "runs a repository's hubconf.py",
    "yaml.unsafe_load": "YAML tags construct arbitrary objects",
    "yaml.full_load": "YAML tags construct arbitrary objects",
    "yaml.load_all": "YAML tags construct arbitrary objects",
    "hydra.utils.instantiate": "imports and calls any class a config names",
    "hydra.utils.call": "imports and calls any function a config names",
    "hydra.utils.get_class": "imports any class a config names",
    "hydra.utils.get_method": "imports any function a config names",
    "hydra.utils.get_object": "imports any object a config names",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str) -> list[tuple[int, str, str]]:
    """(line, call, reason) for every call in `source` that evaluates text or unpickles, imports resolved."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname})
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not (name := _dotted(node.func)):
            continue
        head, _, rest = name.partition(".")
        call = f"{aliases.get(head, head)}{'.' if rest else ''}{rest}".replace("builtins.", "")
        reason = ALWAYS_UNSAFE.get(call)
        if call == "torch.load" and not _is_constant(_keyword(node, "weights_only"), True):
            reason = "torch.load without weights_only=True unpickles"
        elif call == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not (loader is not None and (_dotted(loader) or "").split(".")[-1] in SAFE_YAML_LOADERS):
                reason = "yaml.load without a safe Loader"
        elif call == "numpy.load" and _is_constant(_keyword(node, "allow_pickle"), True):
            reason = "numpy.load(allow_pickle=True) unpickles"
        if _is_constant(_keyword(node, "weights_only"), False):
            reason = "weights_only=False unpickles"
        if _is_constant(_keyword(node, "trust_remote_code"), True):
            reason = "trust_remote_code=True runs a checkpoint's Python code"
        if reason:
            found.append((node.lineno, call, reason))
    return found


def _project_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def test_the_checker_finds_every_unsafe_call_and_accepts_the_safe_ones():
    unsafe = textwrap.dedent(
        """
        import pickle as pk, yaml, torch, numpy as np
        from hydra.utils import instantiate
        from torch import load
        eval(cfg.expr); exec(text); pk.loads(data); torch.load(path); load(path, weights_only=False)
        yaml.load(text); yaml.load(text, Loader=yaml.FullLoader); np.load(path, allow_pickle=True); instantiate(cfg)
        AutoModel.from_pretrained(path, trust_remote_code=True); Module.load_from_checkpoint(path, weights_only=False)
        """
    )
    assert len(unsafe_calls(unsafe)) == 11, unsafe_calls(unsafe)
    safe = textwrap.dedent(
        """
        import ast, yaml, torch, numpy as np
        model.eval(); ast.literal_eval(text); torch.load(path, weights_only=True); yaml.safe_load(text)
        yaml.load(text, Loader=yaml.SafeLoader); np.load(path); Module.load_from_checkpoint(path, weights_only=True)
        """
    )
    assert unsafe_calls(safe) == []


def test_no_project_code_evaluates_text_or_unpickles():
    files = _project_files()
    names = {path.relative_to(ROOT).as_posix() for path in files}
    assert {"trainer.py", "lightning_models.py", "model/strategies.py", "search_app/index.py"} <= names
    problems = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        for line, call, reason in unsafe_calls(path.read_text(encoding="utf-8")):
            if (relative, call) not in ALLOWED:
                problems.append(f"{relative}:{line}: {call}: {reason}")
    assert not problems, "\n".join(problems)


def _yaml_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(map(str, node)) | {key for value in node.values() for key in _yaml_keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in _yaml_keys(value)}
    return set()


def test_configs_name_no_classes_to_instantiate():
    """`_target_` in a config would let config text import and call any class (hydra.utils.instantiate)."""
    configs = sorted((ROOT / "config").rglob("*.yaml"))
    assert len(configs) > 20
    for path in configs:
        keys = _yaml_keys(yaml.safe_load(path.read_text(encoding="utf-8")))
        assert not keys & {"_target_", "_partial_", "_call_", "_args_"}, path


class _RunsOnUnpickle:
    """Unpickling this creates `marker`: a stand-in for a checkpoint that runs code when loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": _RunsOnUnpickle(marker)}}, path)
    return path


def test_checkpoint_loaders_refuse_pickled_code(tmp_path):
    import lightning as L

    from lightning_models import TBPSLitModule
    from search_app.encoder import ModelSourceError, load_encoder

    control = tmp_path / "control"
    torch.load(_payload_checkpoint(tmp_path / "control.ckpt", control), weights_only=False)
    assert control.exists(), "the payload must run when unpickled, or this test proves nothing"

    marker = tmp_path / "ran"
    checkpoint = _payload_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError):  # trainer.py evaluate() and prepare_checkpoints.py: the default
        TBPSLitModule.load_from_checkpoint(checkpoint, map_location="cpu")
    with pytest.raises(pickle.UnpicklingError):  # trainer.fit(ckpt_path=...) resumes through the strategy
        L.Trainer(accelerator="cpu", logger=False).strategy.load_checkpoint(checkpoint)
    with pytest.raises(ModelSourceError, match="pickled code"):
        load_encoder(checkpoint, device=torch.device("cpu"))
    assert not marker.exists()


def test_training_checkpoints_load_as_plain_tensors(demo_root, tmp_path):
    from lightning_models import TBPSLitModule
    from trainer import train

    overrides = demo_overrides(
        demo_root, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "dataset.test_batch_size=512"
    )
    train(compose_config("demo", overrides), tmp_path)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2  # the best and last.ckpt
    for path in checkpoints:
        state = torch.load(path, weights_only=True, map_location="cpu")
        assert {"state_dict", "hyper_parameters", "rng_states", "optimizer_states"} <= set(state)
        TBPSLitModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


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


def test_search_index_is_safetensors_and_json_and_loads_without_unpickling(tmp_path, monkeypatch):
    from search_app.index import SearchIndex, _commit

    embeddings = torch.randn(3, 4)
    _commit(tmp_path / "index", _index_manifest(tmp_path, 3), embeddings)
    names = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert len(names) == 2 and names[0].endswith(".safetensors") and names[1] == "manifest.json", names

    def refuse(*args, **kwargs):
        raise AssertionError("the index must not be unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    assert torch.equal(SearchIndex.load(tmp_path / "index").embeddings, embeddings)


@pytest.mark.parametrize("damage", ["manifest", "embeddings"])
def test_damaged_index_is_a_clear_error(tmp_path, damage):
    from search_app.index import SearchIndex, SearchIndexError, _commit

    index_dir = tmp_path / "index"
    _commit(index_dir, _index_manifest(tmp_path, 3), torch.randn(3, 4))
    target = index_dir / "manifest.json" if damage == "manifest" else next(index_dir.glob("*.safetensors"))
    target.write_bytes(target.read_bytes()[:20])  # truncated, as an index copied by a crashed tool would be
    with pytest.raises(SearchIndexError, match=f"{re.escape(str(index_dir))}.*index again"):
        SearchIndex.load(index_dir)
