"""The config schema: unknown keys and wrong types fail at composition, defaults are written once, Lightning's knobs
are real Trainer arguments, and limiting evaluation batches cuts the queries, never the gallery.
"""

from __future__ import annotations

import inspect
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


def test_clear_names_set_the_original_settings():
    from model.objective import Objective
    from model.strategies import LossSettings

    clear = compose_config(
        "demo", ["loss.simclr=true", "loss.id_classifier=true", "loss.mlm_depth=2", "loss.nitc=false", "loss.SDM=true"]
    )
    original = compose_config(
        "demo", ["loss.SS=true", "loss.ID=true", "loss.cmt_depth=2", "loss.NITC=false", "loss.SDM=true"]
    )
    assert LossSettings.from_mapping(clear.loss) == LossSettings.from_mapping(original.loss)
    settings = LossSettings.from_mapping(clear.loss)
    assert (settings.SS, settings.ID, settings.cmt_depth, settings.NITC) == (True, True, 2, False)
    assert Objective(settings).needs_ss_views and Objective(settings).needs_classifier
    # A recipe's value gives way to the clear name on the command line.
    circle = compose_config("cir_msiglip", ["loss.strategy=auxiliary", "loss.auxiliary_circle=true"])
    assert LossSettings.from_mapping(circle.loss).CIR is True
    assert LossSettings.from_mapping(compose_config("cir_msiglip", ["loss.simclr=false"]).loss).SS is False
