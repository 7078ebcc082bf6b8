"""Export with merged LoRA: plain Hugging Face loading (square), the grid-aware loader (rectangular), files, safety."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, SiglipImageProcessor, SiglipModel

from data.text import CaptionTokenizer
from data.transforms import build_eval_transform
from model.backbone import load_backbone
from model.export import GRID_FIELD, load_exported, merged_backbone
from model.lora import has_lora
from tests.export_helpers import CAPTION, MEAN, STD, assert_same_embeddings, embeddings, export, inputs, lora_model


def test_merged_backbone_is_plain_and_leaves_the_training_model_untouched(tiny_checkpoint):
    model = lora_model(tiny_checkpoint, (32, 32))
    merged = merged_backbone(model.backbone)
    assert type(merged) is SiglipModel and not has_lora(merged) and not hasattr(merged, "peft_config")
    assert merged.state_dict().keys() == AutoModel.from_pretrained(tiny_checkpoint).state_dict().keys()
    assert has_lora(model.backbone)
    pixel_values, input_ids = inputs(AutoTokenizer.from_pretrained(tiny_checkpoint), (32, 32))
    assert_same_embeddings(model, merged, pixel_values, input_ids)

    plain = load_backbone(tiny_checkpoint)
    copy = merged_backbone(plain)
    assert copy is not plain
    for (name, a), b in zip(plain.state_dict().items(), copy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("image_size", [(32, 32), (48, 48)], ids=["native", "resized"])
def test_square_export_loads_with_plain_transformers(tiny_checkpoint, tmp_path, image_size):
    model = lora_model(tiny_checkpoint, image_size)
    out, tokenizer = export(model, tiny_checkpoint, tmp_path / "export", image_size)
    loaded = AutoModel.from_pretrained(out)
    assert type(loaded) is SiglipModel and not has_lora(loaded)
    pixel_values, input_ids = inputs(tokenizer, image_size)
    assert_same_embeddings(model, loaded, pixel_values, input_ids)

    base = load_backbone(tiny_checkpoint, image_size=image_size)  # same weights without the adapters
    image, _ = embeddings(base, pixel_values, input_ids)
    assert (image - model.encode_image(pixel_values)).abs().max() > 1e-2  # the merge is what made them equal


def test_rectangular_export_loads_exactly_with_the_loader_only(tiny_checkpoint, tmp_path):
    image_size = (48, 16)
    model = lora_model(tiny_checkpoint, image_size)
    out, tokenizer = export(model, tiny_checkpoint, tmp_path / "export", image_size)
    assert json.loads((out / "config.json").read_text())["vision_config"][GRID_FIELD] == [6, 2]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loud, never a silently re-initialised grid
        AutoModel.from_pretrained(out)
    loaded = load_exported(out)
    assert type(loaded) is SiglipModel and not loaded.training
    pixel_values, input_ids = inputs(tokenizer, image_size)
    assert_same_embeddings(model, loaded, pixel_values, input_ids)
    assert not hasattr(model.backbone.config.vision_config, GRID_FIELD)  # the export edited a copy


def test_tokenizer_and_preprocessor_files_are_written(tiny_checkpoint, tmp_path):
    image_size = (48, 16)
    out, tokenizer = export(lora_model(tiny_checkpoint, image_size), tiny_checkpoint, tmp_path / "export", image_size)
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
    model = lora_model(tiny_clip_checkpoint, (32, 32))
    out, tokenizer = export(model, tiny_clip_checkpoint, tmp_path / "export", (32, 32))
    pixel_values, input_ids = inputs(tokenizer, (32, 32))
    assert_same_embeddings(model, AutoModel.from_pretrained(out), pixel_values, input_ids)


def test_existing_out_dir_is_refused(tiny_checkpoint, tmp_path):
    (tmp_path / "export").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export(lora_model(tiny_checkpoint, (32, 32)), tiny_checkpoint, tmp_path / "export", (32, 32))


def test_image_size_other_than_the_trained_grid_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="48x16 inputs"):
        export(lora_model(tiny_checkpoint, (48, 16)), tiny_checkpoint, tmp_path / "export", (32, 32))
    assert not (tmp_path / "export").exists()


def test_failed_save_leaves_no_partial_directory(tiny_checkpoint, tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(SiglipImageProcessor, "save_pretrained", full_disk)  # the last file written
    parent = tmp_path / "exports"
    with pytest.raises(OSError, match="No space left"):
        export(lora_model(tiny_checkpoint, (32, 32)), tiny_checkpoint, parent / "run1", (32, 32))
    assert list(parent.iterdir()) == []


def test_export_leaves_the_training_model_unchanged(tiny_checkpoint, tmp_path):
    model = lora_model(tiny_checkpoint, (32, 32))
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    export(model, tiny_checkpoint, tmp_path / "export", (32, 32))
    after = dict(model.backbone.named_parameters())
    assert after.keys() == before.keys()  # adapters still in place: training can resume
    for name, p in after.items():
        assert torch.equal(p, before[name]), name


def test_prepare_checkpoints_exports_a_trained_run(demo_root, tmp_path):
    """The user-facing command: Lightning checkpoint -> Hugging Face folder with the same embeddings, the same test
    ranking through transformers' own preprocessing, an adapter folder and a card with the run's test table.
    """
    from lightning_models import TBPSLitModule
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
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    t2i = results["test"]["t2i"]
    row = "| t2i | " + " | ".join(f"{t2i[m]:.2f}" for m in ("R1", "R5", "R10", "mAP", "mINP")) + " |"
    assert row in (out / "README.md").read_text()

    # The test split ranked by evaluation's code path and by plain transformers on the export: the same order.
    records = json.loads((demo_root / "VN3K" / "data_captions.json").read_text(encoding="utf-8"))
    test = [r for r in records if r["split"] == "test"]
    images = [Image.open(demo_root / "VN3K" / "imgs" / r["file_path"]).convert("RGB") for r in test]
    captions = [caption for r in test for caption in r["captions"]]
    cfg = module.cfg
    evaluation = build_eval_transform(tuple(cfg.backbone.image_size), cfg.aug.img.mean, cfg.aug.img.std)
    ours = CaptionTokenizer.from_pretrained(
        cfg.tokenizer.pretrained_model_name_or_path,
        cfg.tokenizer.model_max_length,
        return_attention_mask=cfg.tokenizer.use_attention_mask,
    )(captions)
    processor, tokenizer = AutoImageProcessor.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    texts = tokenizer(
        [" ".join(c.split()) for c in captions],
        padding="max_length",
        max_length=cfg.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = {"attention_mask": texts["attention_mask"]} if cfg.tokenizer.use_attention_mask else {}
    with torch.no_grad():
        image_ours = module.model.encode_image(torch.stack([evaluation(image) for image in images]))
        text_ours = module.model.encode_text(ours["input_ids"], ours.get("attention_mask"))
        image_hf = F.normalize(
            exported.get_image_features(**processor(images, return_tensors="pt")).pooler_output, dim=-1
        )
        text_hf = F.normalize(exported.get_text_features(input_ids=texts["input_ids"], **mask).pooler_output, dim=-1)
    sim_ours, sim_hf = text_ours @ image_ours.T, text_hf @ image_hf.T
    torch.testing.assert_close(sim_hf, sim_ours, atol=1e-5, rtol=0)
    # Evaluation's ranking orders the export's scores too (two scores within float round-off may swap).
    in_our_order = sim_hf.gather(1, sim_ours.argsort(dim=1, descending=True))
    assert bool((in_our_order[:, 1:] <= in_our_order[:, :-1] + 1e-6).all())
