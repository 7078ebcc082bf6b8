"""Check a run's checkpoint and data before a long job, training nothing.

    uv run trainer.py -cn cir_msiglip dataset=vn3k_vi preflight=true

Prints, per split, what the annotation holds and which images exist; the checkpoint's temperature and bias and whether
training will update them; how five captions tokenise; the zero-shot validation t2i R1 with and without the text
attention mask; where one training batch's positive and negative cosines sit against the Circle margins; and how the
identity sampler covers an epoch. Exits 0 when the run would start cleanly, 2 otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from data.readers import READERS, DatasetSplits, read_dataset
from data.samplers import IdentitySampler
from lightning_data import build_datamodule
from lightning_models import TBPSLitModule, pair_statistics
from utils.errors import InputError
from utils.metrics import rank_metrics

log = logging.getLogger(__name__)

#: Captions whose tokenisation is shown.
SHOWN_CAPTIONS = 5


def _split_rows(splits: DatasetSplits) -> list[str]:
    """Records / identities / captions / images found and missing, per split."""
    rows = []
    train_paths = list(dict.fromkeys(s.image_path for s in splits.train))
    parts: list[tuple[str, int, int, list[Path]]] = [
        ("train", len({s.pid for s in splits.train}), len(splits.train), train_paths)
    ]
    for name, split in (("val", splits.val), ("test", splits.test)):
        if split is not None:
            parts.append((name, len(set(split.image_pids)), len(split.captions), list(split.image_paths)))
    for name, identities, captions, paths in parts:
        missing = sum(not path.is_file() for path in paths)
        rows.append(
            f"  {name:5s} {len(paths):7d} images {identities:6d} identities {captions:7d} captions, "
            f"{len(paths) - missing} images found, {missing} missing"
        )
    return rows


def _encode_split(module: TBPSLitModule, loaders: list, device: torch.device, mask: bool) -> tuple:
    gallery, queries = loaders
    model = module.model
    images, image_pids, texts, text_pids = [], [], [], []
    with torch.no_grad():
        for batch in gallery:
            images.append(model.encode_image(batch["images"].to(device)).float())
            image_pids.append(batch["pids"])
        for batch in queries:
            attention = batch.get("caption_attention_mask") if mask else None
            ids = batch["caption_input_ids"].to(device)
            texts.append(model.encode_text(ids, attention.to(device) if attention is not None else None).float())
            text_pids.append(batch["pids"])
    return torch.cat(texts), torch.cat(text_pids), torch.cat(images), torch.cat(image_pids)


def _zero_shot(module: TBPSLitModule, datamodule: Any, device: torch.device) -> list[str]:
    """Validation t2i R1 of the checkpoint as it is, with and without the text attention mask."""
    tokenizer = datamodule.tokenizer
    own = tokenizer.return_attention_mask
    rows = []
    split = "test" if module.cfg.model_selection == "test" else "validation"
    for mask in (False, True):
        tokenizer.return_attention_mask = mask
        loaders = datamodule.val_dataloader()
        texts, text_pids, images, image_pids = _encode_split(module, loaders, device, mask)
        r1 = rank_metrics(texts @ images.T, text_pids.to(device), image_pids.to(device))["R1"]
        used = " (this run's setting)" if mask == own else ""
        rows.append(f"  zero-shot {split} t2i R1 {'with' if mask else 'without'} the text mask: {r1:.2f}{used}")
    tokenizer.return_attention_mask = own
    return rows


def _tokenisation(datamodule: Any) -> list[str]:
    tokenizer = datamodule.tokenizer
    captions = [sample.caption for sample in datamodule.splits.train[:SHOWN_CAPTIONS]]
    encoded = tokenizer(captions)["input_ids"]
    hf = tokenizer.tokenizer
    lowers = hf.tokenize("Áo Sơ Mi TRẮNG") == hf.tokenize("áo sơ mi trắng")
    rows = [
        f"  tokenizer {type(hf).__name__}, {tokenizer.max_length} positions, pad id {hf.pad_token_id}, "
        f"lower-cases: {lowers}, attention mask: {tokenizer.return_attention_mask}"
    ]
    for caption, ids in zip(captions, encoded):
        full = len(hf(caption)["input_ids"])
        truncated = " (TRUNCATED)" if full > tokenizer.max_length else ""
        rows.append(
            f"  {caption[:60]!r}: {full} tokens{truncated}, ids {ids[:8].tolist()}... = "
            f"{hf.convert_ids_to_tokens(ids[:8].tolist())}, last position {hf.convert_ids_to_tokens(int(ids[-1]))!r}"
        )
    return rows


def _batch_geometry(module: TBPSLitModule, loader: Any, device: torch.device) -> list[str]:
    batch = next(iter(loader))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    objective = module.objective
    with torch.no_grad():
        feats = module.model(batch, aug_view=objective.needs_aug_view, ss_views=objective.needs_ss_views)
    stats = {name: float(value) for name, value in pair_statistics(feats).items()}
    margin = objective.settings.circle_margin
    return [
        f"  one training batch: positive cosine s_p {stats['s_p']:+.3f} (Circle pushes it above 1 - m = {1 - margin}), "
        f"negative s_n {stats['s_n']:+.3f} (below m = {margin}), gap {stats['s_gap']:+.3f}"
    ]


def _sampler(loader: Any, num_samples: int) -> list[str]:
    sampler = loader.sampler.sampler
    if isinstance(sampler, IdentitySampler):
        _, coverage = sampler.global_batches(0)
        return [f"  identity sampler ({sampler.coverage}), one epoch: {coverage.describe()}"]
    return [f"  random sampler: {len(sampler)} of {num_samples} samples per epoch"]


def _what_skip_drops(cfg: DictConfig) -> list[str]:
    name = cfg.dataset.dataset_name
    if name not in READERS:
        return []
    skipped = read_dataset(name, cfg.dataset_root_dir, bad_records="skip")
    return [
        f"  dataset.bad_records=skip would drop {skipped.skipped_records} records and {skipped.skipped_captions} "
        "captions (the warning above names the first)"
    ]


def run_preflight(cfg: DictConfig) -> int:
    """Print the preflight report of the composed config; 0 when the run would start cleanly, else 2."""
    problems: list[str] = []
    lines = ["Preflight (nothing is trained):", "Data:"]
    try:
        lines += _what_skip_drops(cfg)
        datamodule = build_datamodule(cfg)
    except InputError as error:
        problems.append(str(error))
        print("\n".join([*lines, f"  PROBLEM: {error}"]))
        print("Preflight FAILED: fix the problem above before starting the run.")
        return 2
    lines += _split_rows(datamodule.splits)
    missing = [row for row in lines if row.endswith("missing") and not row.endswith(" 0 missing")]
    problems += [f"images missing: {row.strip()}" for row in missing]
    train_loader = datamodule.train_dataloader()
    lines += _sampler(train_loader, len(datamodule.splits.train))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = TBPSLitModule(
        cfg,
        num_classes=datamodule.num_train_ids,
        text_vocab_size=datamodule.tokenizer.vocab_size if datamodule.mlm_probability else None,
    ).to(device)
    module.eval()
    backbone = module.model.backbone
    lines.append("Checkpoint:")
    lines.append(f"  {cfg.backbone.path}: training objective {module.objective.describe()}")
    scale = backbone.logit_scale
    lines.append(
        f"  temperature exp(logit_scale) = {scale.detach().exp().item():.3f} (used: "
        f"{module.model.logit_scale.item():.3f}, capped at 100), receives gradients: {scale.requires_grad}"
    )
    bias = getattr(backbone, "logit_bias", None)
    if bias is not None:
        lines.append(f"  logit_bias = {bias.detach().item():.3f}, receives gradients: {bias.requires_grad}")
    lines.append("Tokenisation:")
    lines += _tokenisation(datamodule)
    lines.append("Geometry:")
    lines += _zero_shot(module, datamodule, device)
    lines += _batch_geometry(module, train_loader, device)
    print("\n".join(lines))
    if problems:
        print("Preflight FAILED:\n  " + "\n  ".join(problems))
        return 2
    print("Preflight passed: the run would start cleanly.")
    return 0
