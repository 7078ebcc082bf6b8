"""Config files state only differences: every top-level config, and every option of every group, still resolves to
exactly the values it resolved to before the files were rewritten that way (`tests/data/resolved_configs.json`,
written once from the full files; regenerate only for an intended change of values:
`uv run python -m tests.test_config_snapshot`).

The schema (config_schema.py) adds the keys the files never stated: unset ones (null: Lightning's or the library's
own default applies) and the keys below, each with the value the code used when it was absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, TOP_LEVEL_CONFIGS, compose_config
from utils.config import WORKERS_TO_FEED_THE_GPU

SNAPSHOT = Path(__file__).parent / "data" / "resolved_configs.json"
#: Groups whose options are composed into every top-level config (parity is covered by tests/test_parity.py).
GROUPS = ("dataset", "backbone", "tokenizer", "loss", "aug", "optimizer", "scheduler", "trainer", "lora", "logger")


#: Top-level configs every group option is composed into (a CPU demo and the Circle-Loss recipe).
HOSTS = ("demo", "cir_msiglip")


#: Keys the schema added, with the default the code applied when the key was absent before the schema existed.
SCHEMA_ADDED = {
    ("loss", "softlabel_form"): "probability",  # LossSettings' default
    ("dataset", "mix_form"): "identities",  # cfg.dataset.get("mix_form", "identities")
    ("lora_train_logit_params",): True,  # ${oc.select:lora_train_logit_params,true}
    ("scheduler", "power"): 0.9,  # options.get("power", 0.9)
    ("scheduler", "gamma"): 0.1,  # options.get("gamma", 0.1)
    ("scheduler", "milestones"): [0.5, 0.75],  # options.get("milestones", (0.5, 0.75))
    ("logger", "checkpoint", "every_n_train_steps"): 0,  # last.ckpt after every epoch only
}


def _without_schema_additions(resolved: dict, recorded: dict, path: tuple[str, ...] = ()) -> dict:
    """`resolved` less the keys `recorded` lacks that are unset or hold the value the code used in their absence."""
    kept = {}
    for key, value in resolved.items():
        here = (*path, key)
        if key not in recorded:
            if _unset(value) or SCHEMA_ADDED.get(here, object()) == value:
                continue
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            value = _without_schema_additions(value, recorded[key], here)
        kept[key] = value
    return kept


def _unset(value) -> bool:
    return value is None or (isinstance(value, dict) and all(_unset(v) for v in value.values()))


def _cases() -> list[tuple[str, list[str]]]:
    cases = [(name, []) for name in TOP_LEVEL_CONFIGS]
    for name in HOSTS:
        for group in GROUPS:
            cases += [(name, [f"{group}={option.stem}"]) for option in sorted((CONFIG_DIR / group).glob("*.yaml"))]
    return cases


def _resolved(name: str, overrides: list[str]) -> dict:
    # dataset.num_workers defaults to a count of this machine's cores: resolved as on a GPU server (9+ cores).
    with mock.patch("utils.config.default_num_workers", lambda: WORKERS_TO_FEED_THE_GPU):
        return OmegaConf.to_container(compose_config(name, overrides), resolve=True)


def _key(name: str, overrides: list[str]) -> str:
    return " ".join([name, *overrides])


@pytest.fixture(autouse=True)
def _no_data_root(monkeypatch):
    monkeypatch.delenv("TBPS_DATA_ROOT", raising=False)


def test_every_config_resolves_to_the_recorded_values():
    recorded = json.loads(SNAPSHOT.read_text())
    cases = {_key(*case): case for case in _cases()}
    assert set(recorded) <= set(cases), f"configs or options removed: {sorted(set(recorded) - set(cases))}"
    for key, (name, overrides) in cases.items():
        resolved = _resolved(name, overrides)  # every new option composes too
        if key in recorded:
            assert _without_schema_additions(resolved, recorded[key]) == recorded[key], key


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_a_recipe_is_the_same_as_its_short_form(recipe):
    assert _resolved("train", [f"experiment={recipe}"]) == _resolved(recipe, [])


@pytest.mark.parametrize(
    ("old", "new"),
    [("cir_test", "circle"), ("tbps_clip_no_decay", "tbps_clip_adamw8bit"), ("irra_no_decay", "irra_adamw8bit")],
)
def test_the_original_optimizer_names_are_aliases(old, new):
    assert _resolved("demo", [f"optimizer={old}"]) == _resolved("demo", [f"optimizer={new}"])


if __name__ == "__main__":
    os.environ.pop("TBPS_DATA_ROOT", None)
    snapshot = {_key(name, overrides): _resolved(name, overrides) for name, overrides in _cases()}
    SNAPSHOT.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(snapshot)} resolved configs to {SNAPSHOT}", file=sys.stderr)
