"""LoRA on the tiny SigLIP: what trains, what is skipped, gradient checkpointing, settings validation."""

import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from model.backbone import load_backbone
from model.lora import LoraSettings, apply_lora, has_lora, parameter_counts
from model.tbps import TBPS, HeadSpec

LORA_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "config" / "lora").glob("*.yaml"))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]
SMALL = LoraSettings(r=4, lora_alpha=8)

# Checkpointing is switched on with the deprecated-but-documented alias, as model.backbone does.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def _batch(image_size: tuple[int, int] = (32, 32), batch_size: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(batch_size, 3, *image_size, generator=generator),
        "input_ids": torch.randint(3, 100, (batch_size, 16), generator=generator),
    }


def _loss(backbone: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """SigLIP's own sigmoid loss: it uses both towers, logit_scale and logit_bias."""
    return backbone(**batch, return_loss=True).loss


def _adapter_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in backbone.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("train_logit_params", [True, False])
def test_only_adapters_and_logit_params_train_and_heads_stay_trainable(tiny_checkpoint, train_logit_params):
    model = TBPS(load_backbone(tiny_checkpoint), HeadSpec(simclr=True))
    backbone = model.backbone
    vision = backbone.vision_model
    returned = apply_lora(backbone, LoraSettings(r=4, train_logit_params=train_logit_params))
    assert returned is backbone and model.backbone is backbone and backbone.vision_model is vision
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    expected_logit = {"logit_scale", "logit_bias"} if train_logit_params else set()
    assert trainable - set(_adapter_parameters(backbone)) == expected_logit
    assert all(p.requires_grad for p in _adapter_parameters(backbone).values())
    assert all(p.requires_grad for p in model.simclr_mlp.parameters())
    adapted = sorted(name for name, module in backbone.named_modules() if isinstance(module, BaseTunerLayer))
    assert adapted == sorted(
        f"{tower}.encoder.layers.0.self_attn.{proj}" for tower in ("text_model", "vision_model") for proj in PROJECTIONS
    )


def test_multihead_attention_out_proj_is_skipped_and_logged(tiny_checkpoint, caplog):
    backbone = load_backbone(tiny_checkpoint)
    with caplog.at_level(logging.INFO, logger="model.lora"):
        apply_lora(backbone, LoraSettings(r=4, target_modules=PROJECTIONS))  # the suffix list matches the MHA too
    head_out_proj = backbone.vision_model.head.attention.out_proj
    assert type(head_out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(backbone.vision_model.encoder.layers[0].self_attn.out_proj, BaseTunerLayer)
    assert "vision_model.head.attention.out_proj" in caplog.text and "MultiheadAttention" in caplog.text


def test_sgd_step_changes_adapters_and_logit_params_only(tiny_checkpoint):
    backbone = load_backbone(tiny_checkpoint)
    torch.manual_seed(0)
    apply_lora(backbone, SMALL)
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.5)
    _loss(backbone, _batch()).backward()
    optimizer.step()
    after = dict(backbone.named_parameters())
    # lora_B starts at zero, so in the first step only B (and not A, whose gradient goes through B) moves.
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in _adapter_parameters(backbone) if "lora_B" in name} | {
        "logit_scale",
        "logit_bias",
    }


def test_targets_matching_no_linear_layer_are_named(tiny_checkpoint):
    pattern = r".*\.self_attn\.query"
    with pytest.raises(ValueError, match=re.escape(pattern)):
        apply_lora(load_backbone(tiny_checkpoint), LoraSettings(target_modules=pattern))
    only_mha = r".*\.head\.attention\.out_proj"
    with pytest.raises(ValueError, match=re.escape(only_mha)):
        apply_lora(load_backbone(tiny_checkpoint), LoraSettings(target_modules=only_mha))
    with pytest.raises(ValueError, match="not Linear layers.*SiglipAttention"):
        apply_lora(load_backbone(tiny_checkpoint), LoraSettings(target_modules=r".*\.self_attn"))


def test_parameter_counts_are_reported(tiny_checkpoint, caplog):
    backbone = load_backbone(tiny_checkpoint)
    base_total = sum(p.numel() for p in backbone.parameters())
    with caplog.at_level(logging.INFO, logger="model.lora"):
        apply_lora(backbone, SMALL)
    expected_adapters = 0
    for tower in (backbone.config.text_config, backbone.config.vision_config):
        per_projection = SMALL.r * (tower.hidden_size + tower.hidden_size)  # A: r x in, B: out x r
        expected_adapters += tower.num_hidden_layers * len(PROJECTIONS) * per_projection
    trainable, total = parameter_counts(backbone)
    assert (trainable, total) == (expected_adapters + 2, base_total + expected_adapters)
    assert f"{trainable} trainable of {total}" in caplog.text


@pytest.mark.parametrize("order", ["checkpointing_first", "lora_first"])
def test_gradient_checkpointing_gives_adapters_the_same_gradients(tiny_checkpoint, order):
    image_size = (48, 16)  # the once-resized 6x2 grid
    backbone = load_backbone(
        tiny_checkpoint, image_size=image_size, gradient_checkpointing=order == "checkpointing_first"
    )
    apply_lora(backbone, SMALL)
    if order == "lora_first":
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.no_grad():
        for name, p in _adapter_parameters(backbone).items():
            if "lora_B" in name:
                p.normal_(std=0.1)  # non-zero B, so that A's gradient is non-zero too
    reference = load_backbone(tiny_checkpoint, image_size=image_size)
    apply_lora(reference, SMALL)
    reference.load_state_dict(backbone.state_dict())
    assert backbone.vision_model.encoder.gradient_checkpointing and backbone.text_model.encoder.gradient_checkpointing
    assert not reference.vision_model.encoder.gradient_checkpointing

    batch = _batch(image_size)
    calls = []
    probe = backbone.vision_model.encoder.layers[0].self_attn.q_proj.base_layer
    probe.register_forward_hook(lambda *_: calls.append(1))
    for model in (backbone, reference):
        model.train()  # lora_dropout active: checkpointing must replay the same dropout masks
        torch.manual_seed(7)
        _loss(model, batch).backward()
    assert len(calls) == 2  # the checkpointed layer ran again in the backward pass

    adapters, expected = _adapter_parameters(backbone), _adapter_parameters(reference)
    assert len(adapters) == 16  # A and B of 4 projections x 2 towers
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, expected[name].grad, msg=name)


def test_apply_lora_twice_is_refused(tiny_checkpoint):
    backbone = apply_lora(load_backbone(tiny_checkpoint), SMALL)
    assert has_lora(backbone)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(backbone, SMALL)


def test_invalid_settings_are_all_reported(tiny_checkpoint):
    settings = LoraSettings(r=0, lora_alpha=0, lora_dropout=1.0, bias="some", target_modules="(")
    problems = settings.problems()
    assert len(problems) == 5
    with pytest.raises(ValueError) as error:
        apply_lora(load_backbone(tiny_checkpoint), settings)
    for field in ("lora.r", "lora.lora_alpha", "lora.lora_dropout", "lora.bias", "lora.target_modules"):
        assert field in str(error.value)


def test_from_mapping_rejects_unknown_keys_and_reads_lists():
    with pytest.raises(ValueError, match=r"Unknown lora config keys \['rank'\].*'r'"):
        LoraSettings.from_mapping({"rank": 8})
    settings = LoraSettings.from_mapping(OmegaConf.create({"target_modules": ["q_proj", "v_proj"]}))
    assert settings.target_modules == ["q_proj", "v_proj"] and type(settings.target_modules) is list


@pytest.mark.parametrize("path", LORA_CONFIGS, ids=lambda p: p.stem)
def test_shipped_lora_configs_are_valid(path):
    settings = LoraSettings.from_mapping(OmegaConf.load(path))
    assert settings.problems() == []
    if path.stem == "cir":
        assert settings == LoraSettings()  # the defaults are the Circle-Loss runs' settings


def test_lora_from_the_config_trains_only_adapters_logit_params_and_heads(demo_root):
    from lightning_models import TBPSLitModule
    from tests.conftest import compose_config, demo_overrides

    module = TBPSLitModule(compose_config("demo", demo_overrides(demo_root, "lora=cir", "loss.SS=true")))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in name or name.endswith(("logit_scale", "logit_bias")) or name.startswith("model.simclr_mlp")
        for name in trainable
    ), sorted(trainable)[:10]
    assert any("vision_model" in name for name in trainable) and any("text_model" in name for name in trainable)
