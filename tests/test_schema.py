"""The config schema: unknown keys and wrong types fail at composition, defaults are written once, Lightning's knobs
are real Trainer arguments, and limiting evaluation batches cuts the queries, never the gallery.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from config_schema import TBPSConfig, TrainerSettings, typed, validate_config
from tests.conftest import CONFIG_DIR, compose_config, demo_overrides
from utils.config import ConfigError


def _chain(error: BaseException) -> str:
    text = []
    while error is not None:
        text.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(text)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("dataset.batch_sise=8", "batch_sise"),  # a typo
        ("loss.circle_gamma=abc", "circle_gamma"),  # a float field
        ("dataset.batch_size=8.5", "batch_size"),  # an int field
        ("trainer.max_epoch=3", "max_epoch"),
        ("lora=cir", None),  # valid, for contrast
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition_with_hydras_message(override, needle):
    if needle is None:
        compose_config("demo", [override])
        return
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("demo", [override])
    assert needle in _chain(info.value)


def test_keys_added_with_plus_are_refused_by_validation():
    # Hydra appends `+key=...` even under a schema; validation names the key and the valid ones.
    cfg = compose_config("demo", ["+dataset.shuffle_buffer=3", "++trainer.not_a_knob=1"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "Unknown dataset setting(s) ['shuffle_buffer']" in message and "batch_size" in message
    assert "Unknown trainer setting(s) ['not_a_knob']" in message


def test_every_trainer_setting_is_a_lightning_trainer_argument():
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    fields = set(OmegaConf.structured(TrainerSettings).keys())
    assert fields <= accepted, fields - accepted


def _leaves(node, path=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, node


def test_group_files_without_a_base_state_no_schema_default():
    """Each default is written once: a group file that inherits nothing sets only values that differ from its schema.

    Optimizer files name their class (`type` has no default) and their groups; those are excluded by having none.
    """
    schema = OmegaConf.to_container(OmegaConf.structured(TBPSConfig))
    restated = []
    for path in sorted(CONFIG_DIR.glob("*/*.yaml")):
        group = path.parent.name
        values = yaml.safe_load(path.read_text()) or {}
        if group not in schema or schema[group] is None or "defaults" in values:
            continue
        for keys, value in _leaves(values):
            default = schema[group]
            for key in keys:
                default = default.get(key, object()) if isinstance(default, dict) else object()
            if value == default and value not in ({}, None):
                restated.append(f"{path.relative_to(CONFIG_DIR)}: {'.'.join(keys)}={value!r}")
    assert restated == []


def test_a_checkpoint_config_without_newer_keys_takes_their_defaults():
    resolved = OmegaConf.to_container(compose_config("demo"), resolve=True)
    del resolved["loss"]["softlabel_form"], resolved["dataset"]["mix_form"], resolved["eval_memory_budget_mb"]
    cfg = typed(resolved)
    assert cfg.loss.softlabel_form == "probability"
    assert cfg.dataset.mix_form == "identities"
    assert cfg.eval_memory_budget_mb == 256


def test_limit_val_batches_ranks_the_first_queries_against_the_whole_gallery(demo_root, tmp_path, caplog):
    """`++trainer.limit_val_batches=1` used to cut the gallery to one batch and stop with "queries have no gallery
    item"; it now keeps one batch of queries and every gallery image.
    """
    from data.readers import read_dataset
    from trainer import train

    batch = 16
    cfg = compose_config(
        "demo",
        demo_overrides(
            demo_root,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "++trainer.limit_val_batches=1",
            "++trainer.limit_test_batches=0.5",
            f"dataset.test_batch_size={batch}",
        ),
    )
    with caplog.at_level(logging.WARNING):
        results = train(cfg, tmp_path)
    splits = read_dataset("VN3K_VI", demo_root)
    test_queries, test_images = len(splits.test.captions), len(splits.test.image_paths)
    val_images = len(splits.val.image_paths)
    assert f"val: {batch} of {len(splits.val.captions)} queries ranked against the whole gallery of {val_images} " in (
        caplog.text
    )
    assert f"test: {int(0.5 * test_queries)} of {test_queries} queries ranked against the whole gallery of " in (
        caplog.text
    )
    assert f"gallery of {test_images} images" in caplog.text
    assert 0 <= results["test"]["t2i"]["R1"] <= 100


def test_every_recipe_passes_validation_where_its_files_exist(tmp_path):
    # The demo's assets are built on demand; the other recipes point at checkpoints that do not exist here, which is
    # not a config problem (the backbone check reads the patch size only from an existing folder).
    for recipe in sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")):
        if recipe == "demo":
            continue
        cfg = compose_config(recipe, [f"dataset_root_dir={tmp_path}", "optimizer=tbps_clip"])
        validate_config(cfg)
    assert Path(CONFIG_DIR / "train.yaml").is_file()


def test_clear_names_on_the_command_line_set_the_original_keys():
    from config_schema import with_original_names
    from model.strategies import LossSettings

    clear = ["loss.simclr=true", "loss.id_classifier=true", "loss.mlm_depth=2", "loss.nitc=false", "loss.SDM=true"]
    original = ["loss.SS=true", "loss.ID=true", "loss.cmt_depth=2", "loss.NITC=false", "loss.SDM=true"]
    assert with_original_names(clear) == original
    assert with_original_names(["+loss.auxiliary_circle=true", "loss.simclr_temperature=0.2", "simclr=1"]) == [
        "+loss.CIR=true",
        "loss.simclr_temperature=0.2",
        "simclr=1",
    ]
    # The last override wins, whichever name it uses: both are one key.
    cfg = compose_config("cir_msiglip", with_original_names(["loss.simclr=false", "loss.SS=true", "loss.simclr=false"]))
    assert LossSettings.from_mapping(cfg.loss).SS is False


def test_lightning_values_are_checked_before_anything_loads():
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config("demo", ["trainer.precision=17"]))
    assert "trainer.precision=17" in str(info.value) and "bf16-mixed" in str(info.value)


def test_a_param_group_can_be_added_from_the_command_line():
    cfg = compose_config("demo", ["+optimizer.param_groups.logit.lr_factor=0.1"])
    validate_config(cfg)
    assert cfg.optimizer.param_groups.logit.lr_factor == 0.1
    with pytest.raises(ConfigError, match=r"Unknown optimizer.param_groups.logit setting\(s\) \['lrr'\]"):
        validate_config(compose_config("demo", ["+optimizer.param_groups.logit.lrr=0.1"]))


def test_limit_test_batches_zero_trains_and_validates_without_testing(demo_root, tmp_path):
    """Lightning documents `limit_test_batches=0` as "no test": the run trains, selects, and writes no test table."""
    from trainer import evaluate, train

    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_test_batches=0"]
    results = train(compose_config("demo", demo_overrides(demo_root, *overrides)), tmp_path / "run")
    assert "val" in results and not {"test", "test_last"} & set(results)
    assert json.loads((tmp_path / "run" / "results.json").read_text()).keys() == results.keys()
    checkpoint = f"ckpt_path={tmp_path / 'run' / 'missing.ckpt'}"
    cfg = compose_config("demo", demo_overrides(demo_root, "train=false", checkpoint, "trainer.limit_test_batches=0"))
    with pytest.raises(ConfigError, match="limit_test_batches=0 tests nothing"):
        evaluate(cfg, tmp_path / "eval")


def test_limit_val_batches_zero_switches_validation_off_and_tiny_limits_still_rank(demo_root, tmp_path):
    """Lightning documents `limit_val_batches=0` as "no validation"; a limit keeping fewer captions than the largest
    R@k still evaluates (at least 10 queries are kept, so i2t can rank R@10).
    """
    from trainer import train

    common = ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    results = train(
        compose_config("demo", demo_overrides(demo_root, *common, "trainer.limit_val_batches=0")), tmp_path / "a"
    )
    assert "val" not in results and 0 <= results["test"]["t2i"]["R1"] <= 100
    results = train(
        compose_config(
            "demo", demo_overrides(demo_root, *common, "trainer.limit_val_batches=0.01", "dataset.test_batch_size=4")
        ),
        tmp_path / "b",
    )
    assert {"R1", "R5", "R10"} <= set(results["val"]["i2t"])
