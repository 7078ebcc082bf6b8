"""Caption tokenisation shared by training, evaluation and search.

SigLIP pools the LAST text position (`last_hidden_state[:, -1]`), and was pre-trained on captions padded to the
full length with `</s>` on the right. So every caption is padded to `max_length` on the right: the pooled token is
then always `</s>` (the end-of-sentence token, or a pad, which is the same token) no matter how long the caption is.
Vietnamese text arrives both precomposed (NFC) and decomposed (NFD); tokenizers map the two to different ids, so
every caption is normalised to NFC first.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from utils.errors import InputError

#: How to point at a usable tokenizer (the end of every TokenizerError message).
TOKENIZER_FIX = (
    "set tokenizer.pretrained_model_name_or_path to the checkpoint folder that holds the tokenizer files "
    "(spiece.model / tokenizer.json and tokenizer_config.json), e.g. the one `uv run prepare_checkpoints.py` writes"
)


class TokenizerError(InputError):
    """The tokenizer folder is missing or its files cannot be loaded."""


def normalize_caption(text: str) -> str:
    """NFC-normalise and collapse whitespace."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class CaptionTokenizer:
    """Wrap a Hugging Face tokenizer with the padding and normalisation rules SigLIP needs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, *, return_attention_mask: bool = False):
        """Args:
        tokenizer: Any HF tokenizer (SentencePiece `SiglipTokenizer` for m-SigLIP).
        max_length: Text positions of the backbone (64 for m-SigLIP).
        return_attention_mask: SigLIP was pre-trained without a text attention mask, so the default leaves it
            out; set True to mask pads (parity=seed).
        """
        if tokenizer.pad_token_id is None:
            raise TokenizerError(
                f"Tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path}) has no pad token; SigLIP pads with "
                f"</s>: {TOKENIZER_FIX}."
            )
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.return_attention_mask = return_attention_mask

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int, **kwargs) -> CaptionTokenizer:
        """Load the tokenizer saved in the local folder `path` (never the hub: checkpoints are prepared offline).

        Raises:
            TokenizerError: `path` is not a folder, or its tokenizer files are missing or corrupt.
        """
        if not Path(path).is_dir():
            raise TokenizerError(f"Tokenizer folder {path} does not exist; {TOKENIZER_FIX}.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        # Missing files surface as ValueError/OSError, a corrupt spiece.model as RuntimeError, bad JSON as ValueError.
        except (OSError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TokenizerError(f"Cannot load the tokenizer in {path} ({reason}); {TOKENIZER_FIX}.") from error
        return cls(tokenizer, max_length, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def special_token_ids(self) -> list[int]:
        return list(self.tokenizer.all_special_ids)

    def add_mask_token(self, token: str = "<mask>") -> int:
        """Add a mask token for MLM if the tokenizer has none (SentencePiece SigLIP has none); return its id.

        The text tower's token embedding must then grow to `vocab_size` rows.
        """
        if self.tokenizer.mask_token is None:
            self.tokenizer.add_special_tokens({"mask_token": token})
        return int(self.tokenizer.mask_token_id)

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise a batch: `input_ids` (B, max_length) and, if enabled, `attention_mask` (B, max_length)."""
        encoded = self.tokenizer(
            [normalize_caption(text) for text in captions],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": encoded["input_ids"]}
        if self.return_attention_mask:
            batch["attention_mask"] = encoded["attention_mask"]
        return batch


def random_deletion(text: str, probability: float, rng: random.Random | None = None) -> str:
    """Drop each word with `probability` (EDA, arXiv 1901.11196); always keep at least one word.

    Always returns a string, one-word captions included.
    """
    rng = rng or random  # the module-level generator, which Lightning seeds in every worker
    words = text.split()
    if probability <= 0 or len(words) <= 1:
        return text
    kept = [word for word in words if rng.random() >= probability]
    return " ".join(kept) if kept else rng.choice(words)
