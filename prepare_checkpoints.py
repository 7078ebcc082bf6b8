"""Prepare backbone checkpoints in the Hugging Face layout.

    uv run prepare_checkpoints.py                      # download google/siglip-base-patch16-256-multilingual
    uv run prepare_checkpoints.py --tiny               # build the offline tiny SigLIP used by the demo
    uv run prepare_checkpoints.py --export RUN/checkpoints/last.ckpt --out my_model   # trained model -> HF folder

The download is idempotent (files already present are not fetched again) and lands in `m_siglip_checkpoints/`,
the `backbone.path` of `backbone=m_siglip`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from data.readers import DatasetNotFoundError
from data.synthetic import SyntheticSpec, all_captions, ensure_vn3k
from model.backbone import check_model_dir
from model.checkpoints import TinyCheckpointSpec, write_tiny_checkpoint

log = logging.getLogger("prepare_checkpoints")

MULTILINGUAL_REPO = "google/siglip-base-patch16-256-multilingual"
#: What this project reads from the checkpoint (weights, config, SentencePiece tokenizer, image preprocessing).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "spiece.model"]


def download(repo_id: str, out_dir: Path) -> Path:
    """Download `repo_id` into `out_dir` and check the result loads as a model directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot_download(repo_id=repo_id, local_dir=str(out_dir), allow_patterns=ALLOW_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise SystemExit(
            f"Could not download {repo_id} into {out_dir} ({type(error).__name__}: {error}).\n"
            "The Hugging Face hub is unreachable from this machine. Download the repository elsewhere "
            f"(`huggingface-cli download {repo_id} --local-dir {out_dir.name}`) and copy the folder here, or train "
            "on the embedded default: `uv run trainer.py -cn demo`."
        ) from error
    return check_model_dir(out_dir)


def build_tiny(out_dir: Path, dataset_dir: Path, spec: TinyCheckpointSpec) -> Path:
    """Write the tiny checkpoint (unless present) with a tokenizer trained on the captions of `dataset_dir`."""
    if out_dir.exists():
        log.info("%s already exists; delete it to rebuild.", out_dir)
        return check_model_dir(out_dir)
    return write_tiny_checkpoint(out_dir, all_captions(dataset_dir), spec)


def ensure_demo_assets(cfg: DictConfig) -> None:
    """Create the embedded dataset and the tiny checkpoint when the config asks for them and they are absent.

    `dataset.synthetic` generates `<dataset_root_dir>/VN3K`; `backbone.tiny` builds `backbone.path` with a
    SentencePiece vocabulary trained on the generated captions. Real datasets and checkpoints carry neither key.
    """
    synthetic, root = cfg.dataset.synthetic, Path(cfg.dataset_root_dir)
    if synthetic:
        ensure_vn3k(
            root,
            SyntheticSpec(
                num_identities=synthetic.num_identities,
                images_per_identity=tuple(synthetic.images_per_identity),
                image_size=tuple(synthetic.image_size),
                seed=synthetic.seed,
            ),
        )
    tiny = cfg.backbone.tiny
    if tiny and not Path(cfg.backbone.path).exists():
        if not (root / "VN3K").is_dir():
            raise DatasetNotFoundError(
                f"The tiny tokenizer is trained on {root / 'VN3K'}, which does not exist: set dataset.synthetic "
                "(the demo config does) or point dataset_root_dir at a folder holding VN3K/."
            )
        build_tiny(Path(cfg.backbone.path), root / "VN3K", TinyCheckpointSpec(**tiny))


def export(checkpoint: Path, out_dir: Path) -> Path:
    """Write a trained Lightning checkpoint as a plain Hugging Face model folder (LoRA merged, tokenizer, processor).

    Square training sizes load with `transformers.AutoModel.from_pretrained(out_dir)`; person-shaped sizes (e.g.
    384x128) need `model.export.load_exported(out_dir)`, which restores the resized position grid.
    """
    from data.text import CaptionTokenizer
    from lightning_models import TBPSLitModule
    from model.export import export_model

    if not checkpoint.is_file():
        raise SystemExit(f"--export {checkpoint}: no such checkpoint file.")
    module = TBPSLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    cfg = module.cfg
    tokenizer = CaptionTokenizer.from_pretrained(
        cfg.tokenizer.pretrained_model_name_or_path, cfg.tokenizer.model_max_length
    )
    if module.objective.needs_masked_captions:
        tokenizer.add_mask_token()
    return export_model(
        module.model,
        tokenizer.tokenizer,
        out_dir,
        image_size=tuple(cfg.backbone.image_size),
        mean=list(cfg.aug.img.mean),
        std=list(cfg.aug.img.std),
        text_attention_mask=bool(cfg.tokenizer.use_attention_mask),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", default=MULTILINGUAL_REPO, help="hub repository to download")
    parser.add_argument(
        "--out", type=Path, help="target folder (default: m_siglip_checkpoints, or demo_assets/tiny_siglip with --tiny)"
    )
    parser.add_argument("--tiny", action="store_true", help="build the offline tiny SigLIP instead of downloading")
    parser.add_argument("--export", type=Path, metavar="CKPT", help="export a trained Lightning checkpoint to --out")
    parser.add_argument(
        "--data-root", type=Path, default=Path("demo_assets"), help="where the embedded dataset lives (for --tiny)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args.export:
        if args.out is None:
            parser.error("--export needs --out <folder>")
        path = export(args.export, args.out)
    elif args.tiny:
        dataset_dir = ensure_vn3k(args.data_root, SyntheticSpec())
        path = build_tiny(args.out or args.data_root / "tiny_siglip", dataset_dir, TinyCheckpointSpec())
    else:
        path = download(args.repo_id, args.out or Path("m_siglip_checkpoints"))
    log.info("Checkpoint ready: %s", path)


if __name__ == "__main__":
    main()
