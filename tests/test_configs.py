"""Every shipped config composes; validation reports every problem at once; image sizes parse safely."""

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, TOP_LEVEL_CONFIGS, compose_config
from trainer import validate_config
from utils.config import ConfigError, parse_img_size

SEED_README_COMMAND = [
    "img_size_str='(256,256)'",
    "dataset=cuhk_pedes",
    "dataset.sampler=random",
    "loss.softlabel_ratio=0.0",
    "trainer.max_epochs=60",
    "optimizer=tbps_clip_no_decay",
    "optimizer.param_groups.default.lr=1e-5",
]


@pytest.mark.parametrize("name", TOP_LEVEL_CONFIGS)
def test_every_top_level_config_composes_and_resolves(name):
    cfg = compose_config(name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    height, width = resolved["img_size"]
    assert resolved["backbone"]["image_size"] == [height, width] == resolved["aug"]["img"]["size"]


def test_expected_top_level_configs_exist():
    assert {"demo", "m_siglip", "cir_msiglip"} <= set(TOP_LEVEL_CONFIGS)


def test_demo_config_is_valid():
    validate_config(compose_config("demo"))


def test_seed_readme_command_composes_with_the_seed_values():
    cfg = compose_config("m_siglip", SEED_README_COMMAND)
    assert cfg.img_size == [256, 256]
    assert cfg.dataset.dataset_name == "CUHK-PEDES" and cfg.dataset.sampler == "random"
    assert cfg.optimizer.type == "bitsandbytes.optim.AdamW8bit"
    assert cfg.optimizer.param_groups.default.lr == 1e-5 and cfg.trainer.max_epochs == 60


def test_seed_readme_command_validates_with_a_torch_optimizer():
    overrides = [o for o in SEED_README_COMMAND if not o.startswith("optimizer=")] + ["optimizer=tbps_clip"]
    validate_config(compose_config("m_siglip", overrides))


def test_eight_bit_optimizer_is_refused_clearly_without_bitsandbytes_and_cuda():
    with pytest.raises(ConfigError, match="bitsandbytes"):
        validate_config(compose_config("m_siglip", SEED_README_COMMAND))


def test_validation_reports_every_problem_at_once():
    cfg = compose_config(
        "demo",
        [
            "dataset.dataset_name=NOPE",
            "dataset.sampler=shuffle",
            "loss.strategy=mystery",
            "loss.nitc_loss_weight=-1",
            "optimizer.type=torch.optim.Adagrad",
            "scheduler.mode=zigzag",
            "+loss.FOO=true",
        ],
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    # The unknown loss key stops the loss settings early; everything else is reported together.
    for expected in ("NOPE", "shuffle", "FOO", "Adagrad", "zigzag"):
        assert expected in message
    assert "CUHK-PEDES" in message and "cosine" in message  # valid names are listed


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"mystery.*baseline"):
        validate_config(compose_config("demo", ["loss.strategy=mystery"]))


def test_identity_sampler_batch_must_be_a_multiple_of_num_instance():
    with pytest.raises(ConfigError, match="multiple of dataset.num_instance"):
        validate_config(compose_config("demo", ["dataset.batch_size=9", "dataset.num_instance=2"]))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(384, 128)", [384, 128]),
        ("384,128", [384, 128]),
        ("256", [256, 256]),
        ("[64, 32]", [64, 32]),
        (" (64,32) ", [64, 32]),
    ],
)
def test_parse_img_size_accepts_literals(text, expected):
    assert parse_img_size(text) == expected


@pytest.mark.parametrize(
    "text", ["__import__('os').system('true')", "(384,)", "(0, 128)", "(38.4, 128)", "'a'", "(True, 1)", ""]
)
def test_parse_img_size_rejects_anything_else(text):
    with pytest.raises(ValueError, match="img_size_str"):
        parse_img_size(text)


def test_malformed_img_size_str_is_a_config_error():
    with pytest.raises(ConfigError, match="img_size_str"):
        validate_config(compose_config("demo", ["img_size_str='(64,)'"]))


SEED_IRRA_COMMAND = [
    "img_size_str='(256,256)'",
    "dataset=cuhk_pedes",
    "dataset.sampler=identity",
    "dataset.num_instance=1",
    "loss=irra",
    "loss.softlabel_ratio=0.0",
    "trainer.max_epochs=60",
    "optimizer=irra_no_decay",
    "optimizer.param_groups.default.lr=1e-5",
]


def test_seed_irra_command_composes_and_validates_with_a_torch_optimizer():
    cfg = compose_config("m_siglip", SEED_IRRA_COMMAND)
    assert cfg.loss.MLM and cfg.loss.ID and cfg.optimizer.type == "bitsandbytes.optim.AdamW8bit"
    validate_config(compose_config("m_siglip", [*SEED_IRRA_COMMAND, "optimizer=irra"]))


@pytest.mark.parametrize("loss", sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")))
def test_every_loss_group_validates_on_the_demo(loss):
    validate_config(compose_config("demo", [f"loss={loss}"]))


@pytest.mark.parametrize("strategy", ["baseline", "auxiliary", "intrinsic", "circle_only", "auxiliary_cross"])
def test_every_strategy_validates_from_the_command_line(strategy):
    validate_config(compose_config("cir_msiglip", [f"loss.strategy={strategy}", "dataset=vn3k_vi"]))


def test_intrinsic_strategy_is_rejected_for_softmax_backbones():
    with pytest.raises(ConfigError, match="SigLIP backbone"):
        validate_config(compose_config("clip", ["loss=cir_msiglip", "loss.strategy=intrinsic", "optimizer=tbps_clip"]))


def test_image_size_not_divisible_by_the_patch_is_a_config_error():
    with pytest.raises(ConfigError, match="not divisible by the patch size 8"):
        validate_config(compose_config("demo", ["img_size_str='(60,32)'"]))


def test_ddp_trainer_groups_compose_and_spawn_is_refused():
    gpu = compose_config("cir_msiglip", ["trainer=ddp"])
    assert gpu.trainer.strategy == "ddp" and gpu.trainer.devices == -1
    assert gpu.trainer.log_every_n_steps == 1 and gpu.trainer.max_epochs == 60  # best_msiglip underneath
    cpu = compose_config("demo", ["trainer=ddp_cpu"])
    assert cpu.trainer.accelerator == "cpu" and cpu.trainer.devices == 2 and cpu.trainer.max_epochs == 25
    validate_config(cpu)
    with pytest.raises(ConfigError, match="trainer.strategy=ddp_spawn keeps the results"):
        validate_config(compose_config("demo", ["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"]))


def test_bad_images_policy_is_checked():
    with pytest.raises(ConfigError, match="dataset.bad_images='ignore' is unknown"):
        validate_config(compose_config("demo", ["dataset.bad_images=ignore"]))
