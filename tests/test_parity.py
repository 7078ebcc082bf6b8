"""`parity=seed`: one switch for the original project's behaviour, checked against its formulas.

The expected losses come from `tests/seed_reference.py`, a float64 transcription of the original project's loss
definitions written without reading this code.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.features import TrainFeatures
from model.objective import Objective
from model.strategies import STRATEGIES, LossSettings, StepContext
from tests.conftest import compose_config
from tests.seed_reference import seed_strategy_total
from tests.test_configs import SEED_IRRA_COMMAND, SEED_README_COMMAND
from trainer import validate_config

ROOT = Path(__file__).resolve().parents[1]

#: What parity=seed must set (the original project's behaviour for each switch).
PARITY_VALUES = {
    "loss.nitc_mvs_mode": "seed",
    "loss.softlabel_form": "seed",
    "loss.intrinsic_normalization": "pairs",
    "loss.circle_reduction": "global",
    "loss.circle_gamma": 64,
    "tokenizer.use_attention_mask": True,
    "scheduler.seed_decay": True,
    "eval_scoring": "dot",
    "model_selection": "test",
}


def _seed_script_overrides(strategy: str) -> list[str]:
    """The overrides run_cir_loss.sh / run_cir_full.sh give a strategy's job (read from the shared script body)."""
    script = (ROOT / "scripts" / "run_strategies.sh").read_text()
    common = re.search(r"^common=\((.*)\)$", script, flags=re.M).group(1)
    return [f"loss.strategy={strategy}", *shlex.split(common)]


@pytest.mark.parametrize("config", ["demo", "cir_msiglip", "m_siglip", "siglip", "clip"])
def test_parity_seed_sets_every_switch_in_every_top_level_config(config):
    cfg = compose_config(config, ["parity=seed", "lora=cir"])
    for key, expected in PARITY_VALUES.items():
        assert OmegaConf.select(cfg, key) == expected, (config, key)
    assert cfg.lora.train_logit_params is False
    assert compose_config(config, ["lora=cir"]).lora.train_logit_params is True


@pytest.mark.parametrize("command", [SEED_README_COMMAND, SEED_IRRA_COMMAND], ids=["tbps", "irra"])
def test_parity_seed_composes_with_both_seed_readme_commands(command):
    cfg = compose_config("m_siglip", [*command, "parity=seed"])
    assert cfg.eval_scoring == "dot" and cfg.model_selection == "test" and cfg.img_size == [256, 256]
    torch_optimizer = [o for o in command if not o.startswith("optimizer=")]
    torch_optimizer.append("optimizer=irra" if "loss=irra" in command else "optimizer=tbps_clip")
    validate_config(compose_config("m_siglip", [*torch_optimizer, "parity=seed"]))


def test_the_published_recipe_is_named_separately():
    cfg = compose_config("cir_msiglip", ["parity=seed_published"])
    assert cfg.loss.circle_gamma == 128 and cfg.img_size == [256, 256] and cfg.loss.nitc_mvs_mode == "seed"
    assert compose_config("cir_msiglip", ["parity=seed"]).loss.circle_gamma == 64


def test_lora_under_parity_freezes_the_logit_parameters(tiny_checkpoint):
    from model.backbone import load_backbone
    from model.lora import LoraSettings, apply_lora

    cfg = compose_config("demo", ["parity=seed", "lora=cir"])
    backbone = apply_lora(load_backbone(tiny_checkpoint, image_size=(32, 16)), LoraSettings.from_mapping(cfg.lora))
    assert not backbone.logit_scale.requires_grad and not backbone.logit_bias.requires_grad


def _random_step(seed: int = 0, batch: int = 8, dim: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unit = lambda: F.normalize(torch.randn(batch, dim, generator=g), dim=-1)  # noqa: E731
    return dict(
        image=unit(),
        aug=unit(),
        text=unit(),
        ss_a=torch.randn(batch, dim, generator=g),
        ss_b=torch.randn(batch, dim, generator=g),
        pids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 4]),
    )


@pytest.mark.parametrize("softlabel_ratio", [0.0, 0.4])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_training_step_under_parity_equals_the_seed_formulas(strategy, softlabel_ratio):
    """The seed's five script modes with `-cn cir_msiglip parity=seed` (SimCLR, C-ITC and MVS on, gamma 64)."""
    if softlabel_ratio and strategy in ("intrinsic", "circle_only"):
        pytest.skip("soft labels only soften N-ITC, which these strategies replace")
    overrides = [*_seed_script_overrides(strategy), "parity=seed", f"loss.softlabel_ratio={softlabel_ratio}"]
    settings = LossSettings.from_mapping(compose_config("cir_msiglip", overrides).loss)
    x = _random_step()
    scale, bias = 12.0, -4.0
    feats = TrainFeatures(
        image_feats=x["image"],
        text_feats=x["text"],
        aug_image_feats=x["aug"],
        ss_feats_a=x["ss_a"],
        ss_feats_b=x["ss_b"],
        pids=x["pids"],
        logit_scale=torch.tensor(scale),
        logit_bias=torch.tensor(bias),
    )
    terms = Objective(settings)(feats, StepContext(epoch=3.0))  # soft-label ramp complete
    expected = seed_strategy_total(
        strategy,
        x["image"],
        x["aug"],
        x["text"],
        x["pids"].tolist(),
        scale,
        bias,
        nitc_w=settings.nitc_loss_weight,
        cir_w=settings.circle_loss_weight,
        margin=settings.circle_margin,
        gamma=settings.circle_gamma,
        mvs=settings.MVS,
        ss_a=x["ss_a"],
        ss_b=x["ss_b"],
        ss_w=settings.ss_loss_weight,
        tau=settings.simclr_temperature,
        citc_w=settings.citc_loss_weight,
        citc_in=settings.citc_inmodal_weight,
        citc_inter=settings.citc_intermodal_weight,
        alpha=softlabel_ratio,
    )
    assert sum(value.item() for value in terms.values()) == pytest.approx(expected, rel=1e-5)


def test_the_seed_scripts_run_every_strategy_under_parity_on_the_demo(tmp_path):
    """`--help` of the scripts documents parity; every strategy's override set validates under parity=seed."""
    for strategy in STRATEGIES:
        validate_config(compose_config("cir_msiglip", [*_seed_script_overrides(strategy), "parity=seed", "lora=cir"]))
    usage = subprocess.run(["bash", "run_cir_loss.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 0 and "parity=seed" in usage.stdout
