"""The README's "Add a new loss" steps are all it takes: a pure function and one `LOSSES` entry, nothing else. The
new flag, weight and option then exist in the schema (typed, with their defaults), work from the command line, and
the term trains and is logged. Run in a fresh interpreter, since the registry is read when the settings are built.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import sys
from pathlib import Path

import torch
from model.objectives import LOSSES, Loss


def positive_gap_loss(sim, pos_mask, *, margin):
    """Mean hinge max(0, margin - s_p) over positive text-image pairs.

    Shapes:
        sim: (B_text, B_image), pos_mask: (B_text, B_image) bool -> ()
    """
    pos = pos_mask.float()
    return (torch.relu(margin - sim) * pos).sum() / pos.sum()


LOSSES["gap"] = Loss(
    positive_gap_loss,
    flag="GAP",
    weight_key="gap_loss_weight",
    weight=0.5,
    inputs={"sim": "sim", "pos_mask": "pos_mask"},
    options={"margin": ("gap_margin", 0.8)},
)

# --- nothing else changes; what follows is a user's run ---
from hydra.errors import ConfigCompositionException
from model.features import TrainFeatures
from model.objective import Objective
from model.strategies import LossSettings
from tests.conftest import compose_config, demo_overrides
from trainer import train

root, out = sys.argv[1], sys.argv[2]
assert LossSettings().GAP is False and LossSettings().gap_loss_weight == 0.5 and LossSettings().gap_margin == 0.8
try:
    compose_config("demo", ["loss.GAP=maybe"])
except ConfigCompositionException:
    print("type checked")

# The weighted term, against a loop over pairs written here from the definition.
g = torch.Generator().manual_seed(0)
unit = lambda: torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
pids = torch.tensor([0, 0, 1, 1, 2, 3])
feats = TrainFeatures(unit(), unit(), pids, torch.tensor(10.0), torch.tensor(-3.0), aug_image_feats=unit())
terms = Objective(LossSettings(GAP=True, gap_loss_weight=2.0, gap_margin=0.9))(feats)
pairs = [(i, j) for i in range(6) for j in range(6) if pids[i] == pids[j]]
hinge = sum(max(0.0, 0.9 - float(feats.text_feats[i] @ feats.image_feats[j])) for i, j in pairs) / len(pairs)
assert abs(terms["gap_loss"].item() - 2.0 * hinge) < 1e-5, (terms["gap_loss"].item(), 2.0 * hinge)
print("term matches")

cfg = compose_config(
    "demo",
    demo_overrides(
        root,
        "loss.GAP=true",
        "loss.gap_loss_weight=2.0",
        "loss.gap_margin=0.9",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.log_every_n_steps=1",
        "dataset.test_batch_size=512",
    ),
)
train(cfg, Path(out))
print("trained")
'''


def test_a_new_loss_needs_only_its_function_and_one_registry_entry(demo_root, tmp_path):
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(demo_root), str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert all(step in lines for step in ("type checked", "term matches", "trained")), run.stdout[-3000:]
    (metrics,) = tmp_path.glob("csv/*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = [float(row["train/gap_loss"]) for row in rows if row.get("train/gap_loss")]
    assert len(logged) == 2 and all(value > 0 for value in logged)
