"""Write model directories in the Hugging Face layout: the tiny offline SigLIP (or CLIP) of the demo and tests.

The tiny checkpoint has exactly the files of `google/siglip-base-patch16-256-multilingual` that this project reads
(`config.json`, `model.safetensors`, `spiece.model`, `tokenizer_config.json`, `special_tokens_map.json`,
`preprocessor_config.json`), so it goes through the same `AutoModel` / `AutoTokenizer` code as the real one. Its
SentencePiece vocabulary is trained on the captions it will see, because there is no hub to download one from.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

log = logging.getLogger(__name__)


@dataclass
class TinyCheckpointSpec:
    """Shape of the offline demo backbone (both towers): the `backbone.tiny` config node."""

    architecture: str = "siglip"  # "siglip" (SiglipModel) or "clip" (CLIPModel, for the softmax code path)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    image_size: int = 64  # square, like every SigLIP checkpoint; resized to the training size at load time
    patch_size: int = 8
    vocab_size: int = 1000  # upper bound; SentencePiece may stop earlier on a small corpus
    max_length: int = 64  # text positions, same as the multilingual checkpoint
    logit_scale_init: float = 10.0  # t, as in SigLIP from scratch
    logit_bias_init: float = -3.0  # b ~ logit of the positive rate in a 32-pair batch (2 positives per row)
    seed: int = 0


#: architecture -> (text config, vision config, embedding width) -> randomly initialised dual encoder.
TINY_ARCHITECTURES = {
    "siglip": lambda text, vision, width: SiglipModel(SiglipConfig(text_config=text, vision_config=vision)),
    "clip": lambda text, vision, width: CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)
    ),
}


def train_sentencepiece(captions: Iterable[str], out_prefix: Path, vocab_size: int) -> Path:
    """Train a BPE SentencePiece model with SigLIP's special tokens; return the `.model` path.

    Piece ids follow the T5/SigLIP convention: 0 `<pad>` (unused: SigLIP pads with `</s>`), 1 `</s>`, 2 `<unk>`.
    """
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(captions)),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="bpe",  # unigram collapses to ~200 mostly single-character pieces on small corpora
        character_coverage=1.0,  # keep every Vietnamese diacritic as a character
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    return out_prefix.with_suffix(".model")


def write_tiny_checkpoint(
    out_dir: str | Path, captions: Iterable[str], spec: TinyCheckpointSpec = TinyCheckpointSpec()
) -> Path:
    """Write a randomly initialised tiny SigLIP and its tokenizer to `out_dir` atomically; return `out_dir`.

    The logit scale and bias are set for training from scratch (HF initialises t = 1, b = 0). SigLIP (arXiv
    2303.15343 section 3.3) starts at t = 10, b = -10 so that the initial positive probability matches the positive
    rate of a 32k batch; in a demo batch of 32 pairs with two positives per row that rate is ~1/16, i.e. b ~ -3.
    With b = -10 there, the positives' gradient dominates and both towers collapse to a single direction.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it to rebuild the tiny checkpoint.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        sp_model = train_sentencepiece(captions, staging / "spiece", spec.vocab_size)
        tokenizer = SiglipTokenizer(vocab_file=str(sp_model), model_max_length=spec.max_length)
        tokenizer.save_pretrained(staging)
        for leftover in ("spiece.vocab",):
            (staging / leftover).unlink(missing_ok=True)

        tower = dict(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
        )
        text_config = dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=spec.max_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,  # CLIP pools the first end-of-sentence token
            bos_token_id=tokenizer.eos_token_id,
        )
        vision_config = dict(tower, image_size=spec.image_size, patch_size=spec.patch_size)
        torch.manual_seed(spec.seed)
        if spec.architecture not in TINY_ARCHITECTURES:
            raise ValueError(f"Unknown tiny architecture {spec.architecture!r}; valid: {sorted(TINY_ARCHITECTURES)}.")
        model = TINY_ARCHITECTURES[spec.architecture](text_config, vision_config, spec.hidden_size)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(spec.logit_scale_init))
            if hasattr(model, "logit_bias"):
                model.logit_bias.fill_(spec.logit_bias_init)
        model.save_pretrained(staging)
        SiglipImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ).save_pretrained(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "Wrote tiny %s (%d params, vocab %d) to %s", spec.architecture, model.num_parameters(), len(tokenizer), out_dir
    )
    return out_dir
