"""Shared by the export tests: a tiny LoRA model, its inputs and embeddings, exports with and without the adapter."""

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from model.adapter_export import AdapterBase
from model.backbone import load_backbone
from model.export import export_model
from model.lora import LoraSettings, apply_lora
from model.model_card import CardFacts
from model.tbps import TBPS

MEAN, STD = (0.48, 0.45, 0.4), (0.27, 0.26, 0.28)
CAPTION = "Người phụ nữ mặc áo sơ mi trắng, đeo ba lô đỏ."


def lora_model(checkpoint, image_size: tuple[int, int], text_vocab_size: int | None = None) -> TBPS:
    """A TBPS with LoRA whose B matrices are non-zero, so the merge changes the weights, and a trained (changed)
    logit scale and bias; eval mode.
    """
    model = TBPS(load_backbone(checkpoint, image_size=image_size, text_vocab_size=text_vocab_size))
    torch.manual_seed(0)
    apply_lora(model.backbone, LoraSettings(r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
        model.backbone.logit_scale.add_(0.5)
        if hasattr(model.backbone, "logit_bias"):  # SigLIP only
            model.backbone.logit_bias.add_(-1.5)
    return model.eval()


def inputs(tokenizer, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = torch.randn(3, 3, *image_size, generator=torch.Generator().manual_seed(2))
    captions = [CAPTION, "a man in a black jacket", "áo"]
    input_ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return pixel_values, input_ids["input_ids"]


def embeddings(backbone, pixel_values, input_ids, **vision_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = backbone.get_image_features(pixel_values=pixel_values, **vision_kwargs).pooler_output
        text = backbone.get_text_features(input_ids=input_ids).pooler_output
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def assert_same_embeddings(model: TBPS, loaded, pixel_values, input_ids, **vision_kwargs) -> None:
    image, text = embeddings(loaded, pixel_values, input_ids, **vision_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(image, model.encode_image(pixel_values), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, model.encode_text(input_ids), atol=1e-5, rtol=0)


def export(model: TBPS, checkpoint, out_dir, image_size):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return export_model(model, tokenizer, out_dir, image_size=image_size, mean=MEAN, std=STD), tokenizer


def base(checkpoint) -> AdapterBase:
    return AdapterBase(Path(checkpoint), str(checkpoint), AutoTokenizer.from_pretrained(checkpoint))


def export_with_adapter(model: TBPS, checkpoint, out_dir, image_size, card: CardFacts | None = None):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return export_model(
        model, tokenizer, out_dir, image_size=image_size, mean=MEAN, std=STD, adapter_base=base(checkpoint), card=card
    )
