"""Shared fixtures: a tiny checkpoint, a small generated dataset, and Hydra composition of the real configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from config_schema import register_schema

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
TOP_LEVEL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

CAPTIONS = [
    "Một người phụ nữ tóc dài màu đen, mặc áo sơ mi trắng và quần jean xanh, đeo ba lô đỏ.",
    "A woman with long black hair wearing a white shirt and blue jeans, carrying a red backpack.",
    "Người đàn ông mặc áo khoác đen, quần dài màu xám và giày trắng.",
    "A man in a black jacket, grey trousers and white shoes.",
] * 50

register_schema()


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a top-level config of config/ exactly as `trainer.py -cn <name> overrides...` would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def _tiny(tmp_path_factory, name: str, architecture: str) -> Path:
    from model.checkpoints import TinyCheckpointSpec, write_tiny_checkpoint

    spec = TinyCheckpointSpec(
        architecture=architecture,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        image_size=32,
        patch_size=8,
        vocab_size=200,
        max_length=16,
    )
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / name, CAPTIONS, spec)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny SigLIP (image 32, patch 8, hidden 32) with a SentencePiece tokenizer, in the Hugging Face layout."""
    return _tiny(tmp_path_factory, "tiny", "siglip")


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    """The same as a CLIPModel, for the softmax code path."""
    return _tiny(tmp_path_factory, "tiny_clip", "clip")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small embedded dataset plus a tiny checkpoint trained on its captions, as the demo builds them."""
    from data.synthetic import SyntheticSpec, all_captions, generate_vn3k
    from model.checkpoints import TinyCheckpointSpec, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("demo")
    dataset = generate_vn3k(root, SyntheticSpec(num_identities=120, images_per_identity=(2, 3), seed=1))
    write_tiny_checkpoint(
        root / "tiny_siglip",
        all_captions(dataset),
        TinyCheckpointSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
    )
    return root


def demo_overrides(root: Path, *extra: str) -> list[str]:
    """Overrides that point the demo config at `root` and keep runs short and quiet."""
    return [
        f"dataset_root_dir={root}",
        "logger=csv",
        "dataset.num_workers=0",
        "dataset.synthetic=null",
        "backbone.tiny=null",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _rank_zero_restored():
    """Lightning's DDP strategy sets the process-wide rank-zero flag when a Trainer is built; a test that builds one
    for a simulated rank > 0 would otherwise silence every later test's loggers (they log on rank 0 only).
    """
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    yield
    rank_zero_only.rank = rank
