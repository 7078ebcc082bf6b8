"""Several nodes: torchrun node processes train as one process on the global batch; the README's SLURM job composes.

The node processes are real (two `torchrun --nnodes 2` launches on this machine, gloo, a localhost rendezvous). SLURM
is simulated: its task variables are set as `srun` sets them and the Trainer is built from the README's command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from config_schema import validate_config, with_original_names
from lightning_callbacks import trainer_kwargs
from tests.conftest import compose_config, demo_overrides
from tests.test_distributed import _free_port
from trainer import launcher_overrides
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: Variables through which a launcher tells a process its place; cleared so the machine running pytest adds none.
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE")


def _without_launcher(environment: dict[str, str]) -> dict[str, str]:
    return {
        key: value
        for key, value in environment.items()
        if key not in LAUNCHER_VARIABLES and not key.startswith(("SLURM_", "MASTER_"))
    }


# ---------------------------------------------------------------- two torchrun nodes == one process


def _relative_files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def _weights_with_a_gradient(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights without the attention key biases.

    softmax(q . (k + b)) = softmax(q . k + q . b) over the keys, and q . b is the same for every key of a query: the
    key bias's gradient is zero in exact arithmetic, so what it receives is rounding noise, which Adam scales to
    steps of the full learning rate. Its value after training depends on the summation order, not on the batch.
    """
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    kept = {}
    for name, value in state.items():
        if name.endswith("k_proj.bias"):
            continue
        if name.endswith("in_proj_bias"):  # torch.nn.MultiheadAttention: the query, key and value biases stacked
            query, _, value_bias = value.chunk(3)
            value = torch.cat([query, value_bias])
        kept[name] = value
    return kept


def _stop(process: subprocess.Popen) -> None:
    """Kill `process` and what it started (torchrun's trainer), if still running: no node left waiting for a peer."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_two_torchrun_nodes_train_as_one_process_on_the_global_batch(demo_root, tmp_path):
    """2 nodes x 1 process x batch 8, gathered features == 1 process x batch 16: equal metrics and weights."""
    common = demo_overrides(
        demo_root,
        "loss.gather_features=true",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "dataset.test_batch_size=64",
    )
    nodes_dir, single_dir = tmp_path / "nodes", tmp_path / "single"
    node_command = [
        *("trainer.py", "-cn", "demo", *common, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2"),
        *("dataset.batch_size=8", f"hydra.run.dir={nodes_dir}"),
    ]
    port = _free_port()
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        + ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), *node_command]
        for node in (0, 1)
    ]
    commands.append(
        [sys.executable, "trainer.py", "-cn", "demo", *common, "dataset.batch_size=16", f"hydra.run.dir={single_dir}"]
    )
    environment = _without_launcher(dict(os.environ))
    logs = [tmp_path / f"process{i}.log" for i in range(len(commands))]
    with ExitStack() as stack:  # all three at once: the two nodes must meet, and the reference runs meanwhile
        processes = []
        for command, log in zip(commands, logs):
            output = stack.enter_context(log.open("w"))
            process = subprocess.Popen(
                command, cwd=ROOT, env=environment, stdout=output, stderr=output, start_new_session=True
            )
            processes.append(process)
            stack.callback(_stop, process)
        codes = [process.wait(timeout=480) for process in processes]
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-3000:]

    # Each node process knew its own place (torchrun's GROUP_RANK) and logged to its own file.
    rank0_log, rank1_log = (nodes_dir / "trainer.log").read_text(), (nodes_dir / "trainer_rank1.log").read_text()
    assert "process 0 of 2: node 0, local rank 0" in rank0_log and "process 1 of" not in rank0_log
    assert "process 1 of 2: node 1, local rank 0" in rank1_log and "Test results" not in rank1_log
    assert rank0_log.count("Test results (last epoch)") == 1
    # Rank 0 alone wrote the run folder: the single process's files plus rank 1's own log; the snapshot is rank 0's.
    assert _relative_files(nodes_dir) == _relative_files(single_dir) | {"trainer_rank1.log"}
    assert "trainer_rank1" not in (nodes_dir / ".hydra" / "hydra.yaml").read_text()

    nodes, single = (json.loads((folder / "results.json").read_text()) for folder in (nodes_dir, single_dir))
    assert nodes["best_checkpoint"].replace(str(nodes_dir), "") == single["best_checkpoint"].replace(
        str(single_dir), ""
    )
    # The weights agree to float rounding (below), so embeddings differ by ~1e-7: that can swap two near-tied gallery
    # items (one swap moves the demo's i2t mAP by ~5e-4 points), never a whole point as a different training would.
    for split in ("val", "test_last", "test"):
        for task in ("t2i", "i2t"):
            for metric, value in single[split][task].items():
                assert nodes[split][task][metric] == pytest.approx(value, abs=0.05), (split, task, metric)
    trained, expected = (
        _weights_with_a_gradient(folder / "checkpoints" / "last.ckpt") for folder in (nodes_dir, single_dir)
    )
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- the launcher's variables and the run folder


def _torchrun_variables(rank: int, world: int) -> dict[str, str]:
    """What torchrun sets for global rank `rank` of `world` processes, one per node."""
    return {
        "TORCHELASTIC_RUN_ID": "none",
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": str(rank),
    }


def _launched(variables: dict[str, str]):
    return mock.patch.dict(os.environ, {**_without_launcher(dict(os.environ)), **variables}, clear=True)


def test_a_process_started_without_a_launcher_keeps_hydras_own_settings():
    with _launched({}):
        assert launcher_overrides(["trainer=demo"]) == []
    with _launched(_torchrun_variables(rank=0, world=1)):
        assert launcher_overrides(["trainer=demo"]) == []


def test_launched_processes_share_the_run_folder_and_only_rank_0_writes_hydras_files():
    command = ["trainer=ddp_cpu", "hydra.run.dir=/shared/runs/7"]
    with _launched(_torchrun_variables(rank=0, world=2)):
        assert launcher_overrides(command) == []
    with _launched(_torchrun_variables(rank=1, world=2)):
        assert launcher_overrides(command) == ["hydra.job.name=trainer_rank1", "hydra.output_subdir=null"]


def test_launched_processes_without_a_run_folder_are_refused():
    with _launched(_torchrun_variables(rank=1, world=2)), pytest.raises(ConfigError, match=r"hydra\.run\.dir=<"):
        launcher_overrides(["trainer=ddp_cpu"])


@pytest.mark.slow
def test_trainer_refuses_launched_processes_without_a_run_folder_before_hydra_starts(tmp_path):
    """What the user sees: one message, status 2, and no timestamped folder (a minute on a busy 2-core machine)."""
    environment = {**_without_launcher(dict(os.environ)), **_torchrun_variables(rank=1, world=2)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "trainer.py"), "-cn", "demo", "trainer=ddp_cpu"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "2 processes were launched (TorchElasticEnvironment) but hydra.run.dir is not set" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the README's SLURM job


def _readme_sbatch_script() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Several GPUs and nodes", 1)[1].split("\n## ", 1)[0]
    (script,) = [block for block in re.findall(r"```bash\n(.*?)```", section, re.S) if "#SBATCH" in block]
    return script


def test_the_readme_slurm_job_gives_every_task_its_rank_and_node():
    script = _readme_sbatch_script()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, re.M))
    nodes, per_node, gpus = int(options["nodes"]), int(options["ntasks-per-node"]), int(options["gpus-per-node"])
    (srun,) = [line for line in script.replace("\\\n", " ").splitlines() if line.startswith("srun ")]
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": options["job-name"],
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NODELIST": f"gpu[07-{6 + nodes:02d}]",
    }
    run_dirs = set()
    for task in range(nodes * per_node):
        # SLURM's default (block) distribution: tasks fill node 0, then node 1, ...
        node, local = divmod(task, per_node)
        variables = {**job, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node)}
        with _launched(variables), mock.patch("torch.cuda.device_count", return_value=gpus):
            words = [os.path.expandvars(word) for word in shlex.split(srun)]  # as the batch script's shell expands
            arguments = with_original_names(words[words.index("trainer.py") + 1 :])
            arguments += launcher_overrides(arguments)  # what trainer.py adds before Hydra starts
            assert arguments[0] == "-cn", arguments
            cfg = compose_config(arguments[1], arguments[2:])
            validate_config(cfg)
            trainer = L.Trainer(**trainer_kwargs(cfg), logger=False)  # no GPU here: nothing is placed on one
            environment = trainer.strategy.cluster_environment
            assert isinstance(environment, SLURMEnvironment)
            assert (trainer.world_size, trainer.global_rank) == (nodes * per_node, task)
            assert (trainer.node_rank, trainer.local_rank) == (node, local)
            assert (trainer.num_nodes, trainer.num_devices) == (nodes, per_node)
            assert trainer.strategy.root_device == torch.device("cuda", local)
            assert environment.main_address == "gpu07"
            assert cfg.loss.gather_features
            assert (f"hydra.job.name=trainer_rank{task}" in arguments) == (task > 0)
            run_dirs |= {argument for argument in arguments if argument.startswith("hydra.run.dir=")}
    (run_dir,) = run_dirs  # every task writes to the same folder, and another job to another one
    assert run_dir.endswith("/4242"), run_dir
