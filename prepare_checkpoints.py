"""Prepare backbone checkpoints in the Hugging Face layout.

    uv run prepare_checkpoints.py                      # download google/siglip-base-patch16-256-multilingual
    uv run prepare_checkpoints.py --tiny               # build the offline tiny SigLIP used by the demo
    uv run prepare_checkpoints.py --export RUN/checkpoints/last.ckpt --out my_model   # trained model -> HF folder
        # my_model/: merged model + model card; my_model/adapter/: a LoRA run's adapter alone (peft format)

The download is idempotent (files already present are not fetched again) and lands in `m_siglip_checkpoints/`,
the `backbone.path` of `backbone=m_siglip`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from data.readers import DatasetNotFoundError
from data.synthetic import SyntheticSpec, all_captions, ensure_vn3k
from model.backbone import check_model_dir
from model.checkpoints import TinyCheckpointSpec, write_tiny_checkpoint
from model.model_card import TrainingRecipe

log = logging.getLogger("prepare_checkpoints")

MULTILINGUAL_REPO = "google/siglip-base-patch16-256-multilingual"
DEFAULT_DOWNLOAD_DIR = "m_siglip_checkpoints"
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


#: Caption languages (ISO 639-1) of each `dataset.dataset_name`, for the model card.
CAPTION_LANGUAGES = {
    "VN3K_VI": ("vi",),
    "VN3K_EN": ("en",),
    "VN3K_MIXED": ("vi", "en"),
    "TEN_PERCENT_CUHK_VN3K_MIX": ("en", "vi"),
    "CUHK-PEDES": ("en",),
    "ICFG-PEDES": ("en",),
    "RSTPReid": ("en",),
}
#: The dataset each name reads, for the model card's `datasets` field.
DATASET_IDS = {
    "VN3K_VI": ("VN3K",),
    "VN3K_EN": ("VN3K",),
    "VN3K_MIXED": ("VN3K",),
    "TEN_PERCENT_CUHK_VN3K_MIX": ("CUHK-PEDES", "VN3K"),
}


def base_model_name(path: Path) -> str:
    """The base checkpoint's name for an adapter: the hub id downloaded into the default folder, else the folder."""
    if path.name == DEFAULT_DOWNLOAD_DIR:
        return MULTILINGUAL_REPO
    return str(path)


def run_results(checkpoint: Path) -> dict | None:
    """The test table of `checkpoint` from its run's `results.json` (beside `checkpoints/`), or None.

    `results.json` holds the test of the selected checkpoint (`test`) and of the last epoch (`test_last`); a table is
    returned only when it belongs to `checkpoint`.
    """
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        path = folder / "results.json"
        if not path.is_file():
            continue
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; the model card says 'not evaluated'", path)
            return None
        best = results.get("best_checkpoint")
        if best and Path(best).resolve() == checkpoint.resolve():
            return results.get("test")
        if checkpoint.name == "last.ckpt":
            return results.get("test_last")
    return None


def training_recipe(cfg: DictConfig, objective_summary: str, checkpoint: Path) -> TrainingRecipe:
    """What the model card reports about the run's config."""
    from model.lora import LoraSettings

    if cfg.get("lora"):
        lora = LoraSettings.from_mapping(cfg.lora)
        logits = "; logit scale and bias trained" if lora.train_logit_params else ""
        fine_tuning = (
            f"LoRA r {lora.r}, alpha {lora.lora_alpha}, dropout {lora.lora_dropout} on `{lora.target_modules}`{logits}"
        )
    else:
        fine_tuning = "full fine-tuning"
    name = str(cfg.dataset.dataset_name)
    details = [
        f"Batch {cfg.dataset.batch_size} x accumulation {cfg.trainer.get('accumulate_grad_batches') or 1}; "
        f"optimizer `{cfg.optimizer.type}`, "
        f"lr {cfg.optimizer.param_groups.default.lr}; seed {cfg.seed}",
    ]
    synthetic = bool(cfg.dataset.get("synthetic"))
    return TrainingRecipe(
        fine_tuning=fine_tuning,
        objective=objective_summary,
        epochs=int(cfg.trainer.max_epochs),
        checkpoint=checkpoint.name,
        dataset=f"{name} (generated demo data)" if synthetic else name,
        languages=CAPTION_LANGUAGES.get(name, ("en",)),
        dataset_ids=() if synthetic else DATASET_IDS.get(name, (name,)),
        details=tuple(details),
    )


def export(checkpoint: Path, out_dir: Path, base_model: str | None = None) -> Path:
    """Write a trained Lightning checkpoint as a Hugging Face model folder (LoRA merged, tokenizer, processor, card).

    Square training sizes load with `transformers.AutoModel.from_pretrained(out_dir)`; person-shaped sizes (e.g.
    384x128) need `model.export.load_exported(out_dir)`, which restores the resized position grid (the model card
    shows the same in plain transformers). A LoRA run's adapter alone goes to `out_dir/adapter/` (peft format), its
    `base_model_name_or_path` being `base_model` (default: `base_model_name` of the run's backbone folder).
    """
    import torch

    from config_schema import unreadable_checkpoint
    from data.text import CaptionTokenizer
    from lightning_models import TBPSLitModule
    from model.adapter_export import AdapterBase, restore_base_precision
    from model.export import export_model
    from model.model_card import CardFacts

    if not checkpoint.is_file():
        raise SystemExit(f"--export {checkpoint}: no such checkpoint file.")
    if reason := unreadable_checkpoint(checkpoint):
        raise SystemExit(
            f"--export {checkpoint} is not a readable checkpoint ({reason}); pass a .ckpt written by trainer.py "
            "(e.g. RUN/checkpoints/last.ckpt, copied whole)."
        )
    if out_dir.exists():  # before the minutes of loading, not after
        raise SystemExit(f"--out {out_dir} already exists; choose a new folder, or delete it to export again.")
    try:
        module = TBPSLitModule.load_trained(checkpoint)
    except KeyError as error:  # readable, but not written by TBPSLitModule
        raise SystemExit(
            f"--export {checkpoint} is not a TBPS checkpoint (no {error}); pass a .ckpt written by trainer.py."
        ) from error
    cfg = module.cfg

    def load_tokenizer() -> CaptionTokenizer:
        return CaptionTokenizer.from_pretrained(
            cfg.tokenizer.pretrained_model_name_or_path, cfg.tokenizer.model_max_length
        )

    base_path, base = Path(cfg.backbone.path), None
    if base_path.is_dir():
        base = type(module.model.backbone).from_pretrained(base_path, dtype=torch.float32)
        restored = restore_base_precision(module.model.backbone, base)
        if restored:
            log.info("%d frozen weights, kept in 16 bits during training, take the base checkpoint's values", restored)
    tokenizer = load_tokenizer()
    if module.objective.needs_masked_captions:
        tokenizer.add_mask_token()
    name = base_model or base_model_name(base_path)
    image_size = tuple(cfg.backbone.image_size)
    results = run_results(checkpoint)
    card = CardFacts(
        model_id=str(out_dir),
        base_model=name,
        image_size=image_size,
        text_length=int(cfg.tokenizer.model_max_length),
        text_attention_mask=bool(cfg.tokenizer.use_attention_mask),
        recipe=training_recipe(cfg, module.objective.describe(), checkpoint),
        test_results=results,
    )
    if results is None:
        log.info("No results.json of %s found beside it: the model card says 'not evaluated'", checkpoint)
    return export_model(
        module.model,
        tokenizer.tokenizer,
        out_dir,
        image_size=image_size,
        mean=list(cfg.aug.img.mean),
        std=list(cfg.aug.img.std),
        text_attention_mask=bool(cfg.tokenizer.use_attention_mask),
        adapter_base=AdapterBase(base_path, name, load_tokenizer().tokenizer, loaded=base),
        card=card,
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
        "--base-model",
        metavar="NAME",
        help="the base model's hub id for the LoRA adapter's adapter_config.json and the model card (default: "
        f"{MULTILINGUAL_REPO} for the {DEFAULT_DOWNLOAD_DIR} folder, else the run's backbone folder)",
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path("demo_assets"), help="where the embedded dataset lives (for --tiny)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args.export:
        if args.out is None:
            parser.error("--export needs --out <folder>")
        path = export(args.export, args.out, args.base_model)
    elif args.tiny:
        dataset_dir = ensure_vn3k(args.data_root, SyntheticSpec())
        path = build_tiny(args.out or args.data_root / "tiny_siglip", dataset_dir, TinyCheckpointSpec())
    else:
        path = download(args.repo_id, args.out or Path(DEFAULT_DOWNLOAD_DIR))
    log.info("Checkpoint ready: %s", path)


if __name__ == "__main__":
    main()
