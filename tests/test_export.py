"""Export with merged LoRA: plain Hugging Face loading (square), the grid-aware loader (rectangular), files, safety."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, SiglipImageProcessor, SiglipModel

from model.backbone import load_backbone
from model.export import GRID_FIELD, export_model, load_exported, merged_backbone
from model.lora import LoraSettings, apply_lora, has_lora
from model.tbps import TBPS

MEAN, STD = (0.48, 0.45, 0.4), (0.27, 0.26, 0.28)
CAPTION = "Người phụ nữ mặc áo sơ mi trắng, đeo ba lô đỏ."


def _lora_model(checkpoint, image_size: tuple[int, int]) -> TBPS:
    """A TBPS with LoRA whose B matrices are non-zero, so the merge changes the weights; eval mode."""
    model = TBPS(load_backbone(checkpoint, image_size=image_size))
    torch.manual_seed(0)
    apply_lora(model.backbone, LoraSettings(r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model.eval()


def _inputs(tokenizer, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = torch.randn(3, 3, *image_size, generator=torch.Generator().manual_seed(2))
    captions = [CAPTION, "a man in a black jacket", "áo"]
    input_ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return pixel_values, input_ids["input_ids"]


def _embeddings(backbone, pixel_values, input_ids, **vision_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = backbone.get_image_features(pixel_values=pixel_values, **vision_kwargs).pooler_output
        text = backbone.get_text_features(input_ids=input_ids).pooler_output
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def _assert_same_embeddings(model: TBPS, loaded, pixel_values, input_ids, **vision_kwargs) -> None:
    image, text = _embeddings(loaded, pixel_values, input_ids, **vision_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(image, model.encode_image(pixel_values), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, model.encode_text(input_ids), atol=1e-5, rtol=0)


def _export(model: TBPS, checkpoint, out_dir, image_size):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return export_model(model, tokenizer, out_dir, image_size=image_size, mean=MEAN, std=STD), tokenizer


def test_merged_backbone_is_plain_and_leaves_the_training_model_untouched(tiny_checkpoint):
    model = _lora_model(tiny_checkpoint, (32, 32))
    merged = merged_backbone(model.backbone)
    assert type(merged) is SiglipModel and not has_lora(merged) and not hasattr(merged, "peft_config")
    assert merged.state_dict().keys() == AutoModel.from_pretrained(tiny_checkpoint).state_dict().keys()
    assert has_lora(model.backbone)
    pixel_values, input_ids = _inputs(AutoTokenizer.from_pretrained(tiny_checkpoint), (32, 32))
    _assert_same_embeddings(model, merged, pixel_values, input_ids)

    plain = load_backbone(tiny_checkpoint)
    copy = merged_backbone(plain)
    assert copy is not plain
    for (name, a), b in zip(plain.state_dict().items(), copy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("image_size", [(32, 32), (48, 48)], ids=["native", "resized"])
def test_square_export_loads_with_plain_transformers(tiny_checkpoint, tmp_path, image_size):
    model = _lora_model(tiny_checkpoint, image_size)
    out, tokenizer = _export(model, tiny_checkpoint, tmp_path / "export", image_size)
    loaded = AutoModel.from_pretrained(out)
    assert type(loaded) is SiglipModel and not has_lora(loaded)
    pixel_values, input_ids = _inputs(tokenizer, image_size)
    _assert_same_embeddings(model, loaded, pixel_values, input_ids)

    base = load_backbone(tiny_checkpoint, image_size=image_size)  # same weights without the adapters
    image, _ = _embeddings(base, pixel_values, input_ids)
    assert (image - model.encode_image(pixel_values)).abs().max() > 1e-2  # the merge is what made them equal


def test_rectangular_export_loads_exactly_with_the_loader_only(tiny_checkpoint, tmp_path):
    image_size = (48, 16)
    model = _lora_model(tiny_checkpoint, image_size)
    out, tokenizer = _export(model, tiny_checkpoint, tmp_path / "export", image_size)
    assert json.loads((out / "config.json").read_text())["vision_config"][GRID_FIELD] == [6, 2]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loud, never a silently re-initialised grid
        AutoModel.from_pretrained(out)
    loaded = load_exported(out)
    assert type(loaded) is SiglipModel and not loaded.training
    pixel_values, input_ids = _inputs(tokenizer, image_size)
    _assert_same_embeddings(model, loaded, pixel_values, input_ids)
    assert not hasattr(model.backbone.config.vision_config, GRID_FIELD)  # the export edited a copy


def test_tokenizer_and_preprocessor_files_are_written(tiny_checkpoint, tmp_path):
    image_size = (48, 16)
    out, tokenizer = _export(_lora_model(tiny_checkpoint, image_size), tiny_checkpoint, tmp_path / "export", image_size)
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "spiece.model",
        "tokenizer_config.json",
    } <= {p.name for p in out.iterdir()}
    assert AutoTokenizer.from_pretrained(out)(CAPTION)["input_ids"] == tokenizer(CAPTION)["input_ids"]
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size["height"] == 48 and processor.size["width"] == 16
    assert list(processor.image_mean) == list(MEAN) and list(processor.image_std) == list(STD)
    pixels = processor(Image.new("RGB", (40, 100), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 16)
    torch.testing.assert_close(
        pixels[0, :, 0, 0], (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    )


def test_clip_export_keeps_the_native_grid(tiny_clip_checkpoint, tmp_path):
    model = _lora_model(tiny_clip_checkpoint, (32, 32))
    out, tokenizer = _export(model, tiny_clip_checkpoint, tmp_path / "export", (32, 32))
    pixel_values, input_ids = _inputs(tokenizer, (32, 32))
    _assert_same_embeddings(model, AutoModel.from_pretrained(out), pixel_values, input_ids)


def test_existing_out_dir_is_refused(tiny_checkpoint, tmp_path):
    (tmp_path / "export").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        _export(_lora_model(tiny_checkpoint, (32, 32)), tiny_checkpoint, tmp_path / "export", (32, 32))


def test_image_size_other_than_the_trained_grid_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="48x16 inputs"):
        _export(_lora_model(tiny_checkpoint, (48, 16)), tiny_checkpoint, tmp_path / "export", (32, 32))
    assert not (tmp_path / "export").exists()


def test_failed_save_leaves_no_partial_directory(tiny_checkpoint, tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(SiglipImageProcessor, "save_pretrained", full_disk)  # the last file written
    parent = tmp_path / "exports"
    with pytest.raises(OSError, match="No space left"):
        _export(_lora_model(tiny_checkpoint, (32, 32)), tiny_checkpoint, parent / "run1", (32, 32))
    assert list(parent.iterdir()) == []


def test_export_leaves_the_training_model_unchanged(tiny_checkpoint, tmp_path):
    model = _lora_model(tiny_checkpoint, (32, 32))
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    _export(model, tiny_checkpoint, tmp_path / "export", (32, 32))
    after = dict(model.backbone.named_parameters())
    assert after.keys() == before.keys()  # adapters still in place: training can resume
    for name, p in after.items():
        assert torch.equal(p, before[name]), name


def test_prepare_checkpoints_exports_a_trained_run(demo_root, tmp_path):
    """The user-facing command: Lightning checkpoint -> Hugging Face folder with the same embeddings."""
    import torch

    from lightning_models import TBPSLitModule
    from model.export import load_exported
    from prepare_checkpoints import export
    from tests.conftest import compose_config, demo_overrides
    from trainer import train

    results = train(compose_config("demo", demo_overrides(demo_root, "lora=cir", "trainer.max_epochs=1")), tmp_path)
    out = export(Path(results["best_checkpoint"]), tmp_path / "exported")
    module = TBPSLitModule.load_from_checkpoint(results["best_checkpoint"], map_location="cpu").eval()
    exported = load_exported(out).eval()
    pixels = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expected = module.model.encode_image(pixels)
        got = torch.nn.functional.normalize(exported.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not any("lora" in key for key in exported.state_dict())
