"""Every strategy trains under DDP without `find_unused_parameters`.

A trainable parameter that no loss reads (the logit scale / bias of `intrinsic` and `circle_only`) never receives a
gradient: DDP then stops on the second step with "Expected to have finished reduction in the prior iteration"
unless it searches the graph for unused parameters on every step. The model freezes such parameters
(`TBPS.keep_logit_parameters`), so plain DDP works for every objective.

Real process groups (gloo, 2 CPU processes) are started with torch.multiprocessing; the whole trainer runs as a
subprocess (Lightning's `strategy="ddp"` inside pytest would re-launch pytest itself).
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from model.objective import Objective
from model.strategies import LossSettings, StepContext

ROOT = Path(__file__).resolve().parents[1]
WORLD, STEPS, BATCH = 2, 3, 6
PIDS = [0, 0, 1, 1, 2, 3]
STRATEGIES = ["baseline", "auxiliary", "intrinsic", "circle_only", "auxiliary_cross"]


def _cases() -> dict[str, dict]:
    """Loss settings per case: every strategy with MVS, the Circle-Loss recipe (SS + C-ITC) and IRRA's group."""
    cases = {strategy: dict(strategy=strategy, MVS=True) for strategy in STRATEGIES}
    cases["intrinsic+SS+CITC"] = dict(strategy="intrinsic", MVS=True, SS=True, CITC=True)
    cases["auxiliary_cross+SS+CITC"] = dict(strategy="auxiliary_cross", MVS=True, SS=True, CITC=True)
    from tests.conftest import compose_config

    irra = OmegaConf.to_container(compose_config("demo", ["loss=irra"]).loss)
    assert irra["NITC"] and irra["MLM"] and irra["ID"], irra  # the loss group this case stands for
    cases["irra (NITC+MLM+ID)"] = irra
    return cases


def _batch(vocab: int, seed: int, settings: LossSettings) -> dict[str, torch.Tensor]:
    from data.mlm import mask_tokens

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (BATCH, 16), generator=g)
    ids[:, -4:] = 1  # </s> padding on the right
    images = lambda: torch.randn(BATCH, 3, 32, 16, generator=g)  # noqa: E731
    batch = {
        "images": images(),
        "aug_images": images(),
        "ss_images1": images(),
        "ss_images2": images(),
        "caption_input_ids": ids,
        "pids": torch.tensor(PIDS),
    }
    if settings.MLM:
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
            ids, mask_token_id=vocab - 1, vocab_size=vocab, special_token_ids=[0, 1, 2], generator=g
        )
    return batch


def _build(checkpoint: str, settings: LossSettings, *, freeze_unused: bool):
    from model.build import build_model

    torch.manual_seed(0)  # the same initial heads on every rank
    objective = Objective(settings, use_sigmoid=True)
    model = build_model({"path": checkpoint, "image_size": (32, 16)}, objective, num_classes=max(PIDS) + 1)
    if not freeze_unused:  # the control: every logit parameter trainable, as before build_model froze unused ones
        for name in ("logit_scale", "logit_bias"):
            getattr(model.backbone, name).requires_grad_(True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    return model, ddp, objective


def _loss(model, objective: Objective, batch) -> torch.Tensor:
    feats = model(
        batch,
        aug_view=objective.needs_aug_view,
        ss_views=objective.needs_ss_views,
        raw_features=objective.needs_raw_features,
    )
    return sum(objective(feats, StepContext(epoch=1.0)).values())


def _train(checkpoint: str, settings: LossSettings, rank: int, *, freeze_unused: bool = True) -> dict:
    model, ddp, objective = _build(checkpoint, settings, freeze_unused=freeze_unused)
    vocab = int(model.backbone.config.text_config.vocab_size)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = _loss(ddp, objective, _batch(vocab, seed=100 * step + rank, settings=settings))  # a shard per rank
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():  # the same batch on every rank: equal weights give equal losses
        common = _loss(model, objective, _batch(vocab, seed=12345, settings=settings)).item()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"losses": losses, "common_loss": common, "params": params, "moved": not torch.equal(params, initial)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, checkpoint: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {
            name: _train(checkpoint, LossSettings.from_mapping(values), rank) for name, values in _cases().items()
        }
        # The control: the same intrinsic run without freezing the unused logit parameters fails as the defect did.
        try:
            _train(checkpoint, LossSettings(strategy="intrinsic"), rank, freeze_unused=False)
            results["control"] = "no error"
        except RuntimeError as error:
            results["control"] = str(error)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes train all five strategies: about 35 s on 2 cores
def test_every_strategy_trains_under_ddp_without_searching_for_unused_parameters(tiny_checkpoint, tmp_path):
    mp.start_processes(
        _worker,
        args=(_free_port(), str(tiny_checkpoint), str(tmp_path)),
        nprocs=WORLD,
        start_method="spawn",
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for name in _cases():
        per_rank = [results[name] for results in ranks]
        for rank, result in enumerate(per_rank):
            assert len(result["losses"]) == STEPS and all(math.isfinite(v) for v in result["losses"]), (name, rank)
            assert math.isfinite(result["common_loss"]) and result["moved"], (name, rank)
        # Gradients were averaged across ranks: both hold the same weights after different shards.
        assert torch.equal(per_rank[0]["params"], per_rank[1]["params"]), name
        assert per_rank[0]["common_loss"] == pytest.approx(per_rank[1]["common_loss"], rel=1e-6), name
        assert per_rank[0]["losses"] != per_rank[1]["losses"], name  # each rank trained on its own shard
    for results in ranks:
        assert "Expected to have finished reduction in the prior iteration" in results["control"], results["control"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["intrinsic", "circle_only"])
def test_ddp_trainer_completes_with_a_strategy_that_reads_no_logit_parameter(demo_root, tmp_path, strategy):
    from tests.conftest import demo_overrides

    overrides = demo_overrides(
        demo_root,
        "trainer=ddp_cpu",
        f"loss.strategy={strategy}",
        "trainer.max_epochs=1",
        "dataset.test_batch_size=64",
    )
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "trainer.py", "-cn", "demo", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Expected to have finished reduction" not in done.stdout + done.stderr
    assert (run_dir / "results.json").exists()


NAN_ON_ONE_RANK = """
import sys
from pathlib import Path

sys.path.insert(0, {root!r})
from lightning_training_logs import NonFiniteLossError
from tests.conftest import compose_config, demo_overrides
from tests.test_train_smoke import _PoisonLossAt
from trainer import train


class _PoisonOnRankOne(_PoisonLossAt):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


overrides = ("trainer=ddp_cpu", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "dataset.test_batch_size=64")
cfg = compose_config("demo", demo_overrides(Path({demo_root!r}), *overrides))
try:
    train(cfg, Path({run_dir!r}), callbacks=[_PoisonOnRankOne(2)])
except NonFiniteLossError as error:
    print("STOPPED:", error, flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_naming_that_rank_and_step(demo_root, tmp_path):
    """Only rank 1's loss turns NaN at global step 2 (rank 0's follows through the averaged gradients a step later):
    both processes stop, without hanging, and both name step 2 on rank 1 with rank 1's loss terms then.
    """
    driver = tmp_path / "driver.py"
    run_dir = tmp_path / "run"
    driver.write_text(NAN_ON_ONE_RANK.format(root=str(ROOT), demo_root=str(demo_root), run_dir=str(run_dir)))
    done = subprocess.run([sys.executable, str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=480)
    output = done.stdout + done.stderr
    stopped = re.findall(r"STOPPED: [^\n]*", output)  # a progress bar may precede it on its line
    assert done.returncode == 3 and len(stopped) == 2, output[-3000:]  # Lightning's launcher reruns the driver
    for line in stopped:
        assert "at global step 2 on rank 1 (detected at step" in line and "nitc_loss=nan" in line, line
    assert not list(run_dir.rglob("*.ckpt"))
