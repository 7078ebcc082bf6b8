"""Batches of the data module's loaders: training samples with tokenised (and, for MLM, masked) captions, queries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from data.mlm import mask_tokens
from data.text import CaptionTokenizer


def collate_train(
    samples: Sequence[Mapping[str, Any]], tokenizer: CaptionTokenizer, mlm_probability: float | None = None
) -> dict[str, Any]:
    """Stack a training batch, tokenise its (already augmented) captions and, for MLM, mask a copy of them.

    Each caption is masked with a generator seeded from its own sample's seed, so the masks, like the image views,
    depend only on (seed, epoch, sample), not on which samples share its batch or process.
    """
    captions = [sample["captions"] for sample in samples]
    batch = default_collate([{k: v for k, v in sample.items() if k != "captions"} for sample in samples])
    for key, value in tokenizer(captions).items():
        batch[f"caption_{key}"] = value
    if mlm_probability:
        rows = [
            mask_tokens(
                ids,
                mask_token_id=tokenizer.tokenizer.mask_token_id,
                vocab_size=tokenizer.vocab_size,
                special_token_ids=tokenizer.special_token_ids,
                probability=mlm_probability,
                generator=torch.Generator().manual_seed(int(sample["sample_seeds"])),
            )
            for ids, sample in zip(batch["caption_input_ids"], samples)
        ]
        batch["mlm_input_ids"] = torch.stack([masked for masked, _ in rows])
        batch["mlm_labels"] = torch.stack([labels for _, labels in rows])
        if "caption_attention_mask" in batch:
            batch["mlm_attention_mask"] = batch["caption_attention_mask"]
    return batch


def collate_text(samples: Sequence[Mapping[str, Any]], tokenizer: CaptionTokenizer) -> dict[str, Any]:
    batch = {"pids": torch.tensor([sample["pids"] for sample in samples])}
    for key, value in tokenizer([sample["captions"] for sample in samples]).items():
        batch[f"caption_{key}"] = value
    return batch
