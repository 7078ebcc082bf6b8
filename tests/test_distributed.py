"""Data parallelism: distributed sampling, the gathered global-batch loss, and sharded evaluation.

Real process groups (gloo, 2 CPU processes) are started with torch.multiprocessing or, for the whole trainer, as a
subprocess: Lightning's `strategy="ddp"` inside pytest would re-launch pytest itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from data.datasets import ImageReadError
from data.samplers import IdentitySampler, StridedShardSampler
from model.features import TrainFeatures, gathered
from model.objective import Objective
from model.strategies import LossSettings, StepContext
from utils.config import ConfigError
from utils.distributed import all_gather_with_grad, gather_strided_shards
from utils.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _dataset(num_ids: int = 23) -> tuple[list[int], list[int]]:
    """Pids and image ids of a caption-level dataset with uneven identities (1..4 images, 2 captions each)."""
    pids, image_ids = [], []
    image = 0
    for pid in range(num_ids):
        for _ in range(1 + pid % 4):
            pids += [pid, pid]
            image_ids += [image, image]
            image += 1
    return pids, image_ids


def _batches(sampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("epoch", [0, 3])
def test_distributed_identity_sampler_splits_the_single_process_global_batches(epoch):
    pids, image_ids = _dataset()
    batch, k = 8, 2
    single = IdentitySampler(pids, image_ids, batch * WORLD, k, seed=5)
    ranks = [IdentitySampler(pids, image_ids, batch, k, seed=5, num_replicas=WORLD, rank=r) for r in range(WORLD)]
    for sampler in (single, *ranks):
        sampler.set_epoch(epoch)
    global_batches = _batches(single, batch * WORLD)
    per_rank = [_batches(sampler, batch) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(global_batches) > 0
    for step, expected in enumerate(global_batches):
        local = [per_rank[r][step] for r in range(WORLD)]
        assert local[0] + local[1] == expected
        identities = [{pids[i] for i in indices} for indices in local]
        assert not identities[0] & identities[1], "ranks share an identity within a step"
        assert all(len(ids) == batch // k for ids in identities)


def test_distributed_identity_sampler_is_deterministic_per_epoch():
    pids, image_ids = _dataset()
    make = lambda: IdentitySampler(pids, image_ids, 8, 2, seed=1, num_replicas=WORLD, rank=1)  # noqa: E731
    a, b = make(), make()
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_strided_shards_cover_every_item_once_and_gather_back_in_order():
    for size in (1, 2, 7, 10):
        shards = [list(StridedShardSampler(size, WORLD, r)) for r in range(WORLD)]
        assert sorted(shards[0] + shards[1]) == list(range(size))
        items = torch.arange(size * 3, dtype=torch.float32).reshape(size, 3)
        local = [items[shard] for shard in shards]
        # What the all-gathers return on every rank: first the shard sizes, then the padded shards.
        longest = max(len(shard) for shard in shards)
        counts = torch.stack([torch.tensor([len(shard)]) for shard in shards])
        padded = torch.stack([torch.cat([x, x.new_full((longest - x.shape[0], 3), -1.0)]) for x in local])
        for rank in range(WORLD):
            answers = iter([counts, padded])
            result = gather_strided_shards(local[rank], gather=lambda _tensor, answers=answers: next(answers))
            assert torch.equal(result, items), (size, rank)


# ---------------------------------------------------------------- gathered loss == single-process loss

#: Loss settings covering every strategy and every gathered auxiliary term (softmax N-ITC too).
LOSS_CASES = [
    (dict(strategy="baseline", softlabel_ratio=0.3), True),
    (dict(strategy="auxiliary", CIR=True, circle_loss_weight=0.5), True),
    (dict(strategy="auxiliary_cross", CIR=True, circle_reduction="per_anchor", SS=True, CITC=True), True),
    (dict(strategy="intrinsic"), True),
    (dict(strategy="circle_only"), True),
    (dict(strategy="baseline", RITC=True, ITC=True, SDM=True, CMPM=True, ID=True), True),
    (dict(strategy="baseline", MVS=False, softlabel_ratio=0.3), False),
]
FEATURE_DIM, INPUT_DIM, NUM_IDS, LOCAL_BATCH = 8, 6, 5, 6


class _Towers(nn.Module):
    """Linear image and text towers with a SigLIP logit scale and bias: every TrainFeatures field has a gradient."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(INPUT_DIM, FEATURE_DIM)
        self.text = nn.Linear(INPUT_DIM, FEATURE_DIM)
        self.simclr = nn.Linear(FEATURE_DIM, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, NUM_IDS)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, images, augmented, texts, pids) -> dict[str, torch.Tensor]:
        image, aug, text = self.image(images), self.image(augmented), self.text(texts)
        return dict(
            image_feats=F.normalize(image, dim=-1),
            aug_image_feats=F.normalize(aug, dim=-1),
            text_feats=F.normalize(text, dim=-1),
            ss_feats_a=F.normalize(self.simclr(image), dim=-1),
            ss_feats_b=F.normalize(self.simclr(aug), dim=-1),
            id_logits_image=self.classifier(image),
            id_logits_text=self.classifier(text),
            raw_image_feats=image,
            raw_text_feats=text,
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias * 1.0,  # a fresh tensor: DDP cannot hook a parameter returned as-is
            pids=pids,
        )


def _batch(world: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(11)
    n = LOCAL_BATCH * world
    images, augmented, texts = (torch.randn(n, INPUT_DIM, generator=generator) for _ in range(3))
    pids = torch.randint(0, NUM_IDS, (n,), generator=generator)
    return images, augmented, texts, pids


def _losses_and_grads(model: nn.Module, inputs, gather) -> list[tuple[float, dict[str, torch.Tensor]]]:
    outcomes = []
    for values, use_sigmoid in LOSS_CASES:
        model.zero_grad()
        feats = TrainFeatures(**model(*inputs))
        if gather is not None:
            feats = gathered(feats, gather)
        objective = Objective(LossSettings(**values), use_sigmoid=use_sigmoid)
        total = torch.stack(list(objective(feats, StepContext(epoch=0.5)).values())).sum()
        total.backward()
        module = getattr(model, "module", model)
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
        outcomes.append((total.item(), grads))
    return outcomes


def _gathered_loss_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(_Towers(), find_unused_parameters=True)
        shard = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        inputs = [tensor[shard] for tensor in _batch(WORLD)]
        torch.save(_losses_and_grads(model, inputs, all_gather_with_grad), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gathered_loss_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.start_processes(
        _gathered_loss_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True
    )
    torch.manual_seed(0)
    expected = _losses_and_grads(_Towers(), _batch(WORLD), gather=None)
    for rank in range(WORLD):
        outcomes = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for (values, _), (loss, grads), (expected_loss, expected_grads) in zip(LOSS_CASES, outcomes, expected):
            assert loss == pytest.approx(expected_loss, rel=1e-5), values
            for name, grad in grads.items():
                torch.testing.assert_close(
                    grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{values} {name} {m}"
                )


def test_local_loss_without_gathering_differs_from_the_global_batch():
    """The control: without gathering, each rank's contrastive loss sees only its own negatives."""
    torch.manual_seed(0)
    model = _Towers()
    inputs = _batch(WORLD)
    shard = [tensor[:LOCAL_BATCH] for tensor in inputs]
    full, local = _losses_and_grads(model, inputs, None), _losses_and_grads(model, shard, None)
    assert full[0][0] != pytest.approx(local[0][0], rel=1e-3)


# ---------------------------------------------------------------- the trainer under DDP


@pytest.mark.slow
def test_ddp_training_completes_and_sharded_evaluation_equals_one_process(demo_root, tmp_path):
    from tests.conftest import compose_config, demo_overrides
    from trainer import evaluate

    overrides = demo_overrides(
        demo_root,
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "loss.gather_features=true",
        "loss.CIR=true",
        "loss.strategy=auxiliary_cross",
        "dataset.sampler=identity",
        "dataset.batch_size=8",
        "dataset.test_batch_size=64",
    )
    command = [sys.executable, "trainer.py", "-cn", "demo", *overrides, f"hydra.run.dir={tmp_path / 'ddp'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert (done.stdout + done.stderr).count("Test results (last epoch)") == 1, "metrics must be reported once"

    single_cfg = compose_config(
        "demo",
        demo_overrides(demo_root, "train=false", f"ckpt_path={tmp_path / 'ddp' / 'checkpoints' / 'last.ckpt'}"),
    )
    single = evaluate(single_cfg, tmp_path / "single")
    for task in ("t2i", "i2t"):
        for metric, value in single["test"][task].items():
            assert ddp["test_last"][task][metric] == pytest.approx(value, abs=1e-9), (task, metric)


# ---------------------------------------------------------------- failure modes that would hang or mislead ranks


def test_identity_sampler_too_few_identities_for_all_ranks_names_the_settings():
    pids, image_ids = _dataset(num_ids=6)
    IdentitySampler(pids, image_ids, 8, 2, num_replicas=1)  # 4 identities per batch: enough for one process
    with pytest.raises(InputError, match=r"needs 8 training identities .*\(trainer\.devices\)"):
        IdentitySampler(pids, image_ids, 8, 2, num_replicas=2, rank=0)


def test_evaluation_split_smaller_than_the_world_is_refused(demo_root):
    from types import SimpleNamespace

    from lightning_data import build_datamodule
    from tests.conftest import compose_config, demo_overrides

    datamodule = build_datamodule(compose_config("demo", demo_overrides(demo_root)))
    datamodule.trainer = SimpleNamespace(world_size=10**6, global_rank=0)
    with pytest.raises(ConfigError, match="fewer than the 1000000 processes"):
        datamodule.test_dataloader()
    datamodule.trainer = SimpleNamespace(world_size=2, global_rank=1)
    gallery, queries = datamodule.test_dataloader()
    assert list(gallery.sampler) == list(range(1, len(datamodule.splits.test.image_paths), 2))


def test_random_states_are_saved_per_rank_and_old_checkpoints_still_restore():
    from lightning_models import TBPSLitModule
    from utils.rng import rng_states

    module = TBPSLitModule.__new__(TBPSLitModule)  # the hooks read no weights: a bare module with no logs held back
    module._init_training_logs()
    module.val_history = {}
    checkpoint = {}
    torch.manual_seed(3)
    module.on_save_checkpoint(checkpoint)
    assert isinstance(checkpoint["rng_states"], list) and len(checkpoint["rng_states"]) == 1
    expected = torch.rand(4)
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(3)
    legacy = {"rng_states": rng_states()}  # one dict, as checkpoints of earlier versions hold
    expected = torch.rand(4)
    module.on_load_checkpoint(legacy)
    assert torch.equal(torch.rand(4), expected)


def test_errors_from_dataloader_workers_are_reported_as_their_own_message():
    from utils.errors import user_message

    wrapped = ImageReadError(
        "Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "data/datasets.py", line 40, in load_rgb\n'
        "data.datasets.ImageReadError: cannot read image /d/imgs/a.jpg (truncated); fix the file\n"
    )
    assert user_message(wrapped) == "cannot read image /d/imgs/a.jpg (truncated); fix the file"
    assert user_message(ImageReadError("plain message")) == "plain message"
