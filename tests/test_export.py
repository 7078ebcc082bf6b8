"""Export with merged LoRA: plain Hugging Face loading (square), the grid-aware loader (rectangular), files, safety;
the peft adapter folder, the model card and its snippets, and the image processor against evaluation.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub import metadata_load
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, SiglipImageProcessor, SiglipModel

from data.text import CaptionTokenizer
from data.transforms import build_eval_transform
from model.adapter_export import AdapterBase
from model.backbone import load_backbone
from model.export import GRID_FIELD, export_model, load_exported, merged_backbone
from model.lora import LoraSettings, apply_lora, has_lora
from model.model_card import CardFacts, TrainingRecipe, front_matter
from model.tbps import TBPS

MEAN, STD = (0.48, 0.45, 0.4), (0.27, 0.26, 0.28)
CAPTION = "Người phụ nữ mặc áo sơ mi trắng, đeo ba lô đỏ."


def _lora_model(checkpoint, image_size: tuple[int, int], text_vocab_size: int | None = None) -> TBPS:
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


# ---------------------------------------------------------------- adapter folder (peft format)


def _base(checkpoint) -> AdapterBase:
    return AdapterBase(Path(checkpoint), str(checkpoint), AutoTokenizer.from_pretrained(checkpoint))


def _export_with_adapter(model: TBPS, checkpoint, out_dir, image_size, card: CardFacts | None = None):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return export_model(
        model, tokenizer, out_dir, image_size=image_size, mean=MEAN, std=STD, adapter_base=_base(checkpoint), card=card
    )


@pytest.mark.parametrize(
    ("image_size", "grow_vocab"),
    [((32, 32), False), ((48, 16), True)],
    ids=["native-square", "rectangular-with-mask-token-row"],
)
def test_adapter_folder_loads_with_peft_and_reproduces_the_merged_export(
    tiny_checkpoint, tmp_path, image_size, grow_vocab
):
    vocab = len(AutoTokenizer.from_pretrained(tiny_checkpoint))
    model = _lora_model(tiny_checkpoint, image_size, text_vocab_size=vocab + 1 if grow_vocab else None)
    out = _export_with_adapter(model, tiny_checkpoint, tmp_path / "export", image_size)
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_checkpoint) and config["peft_type"] == "LORA"
    assert not (adapter / "model.safetensors").exists()
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    # Only adapter matrices and the two trained logit scalars: no full weight travels in the adapter folder.
    assert all("lora_" in key for key in keys - {"base_model.model.logit_scale", "base_model.model.logit_bias"})
    assert {"base_model.model.logit_scale", "base_model.model.logit_bias"} <= keys

    peft_model = PeftModel.from_pretrained(SiglipModel.from_pretrained(tiny_checkpoint), adapter).eval()
    merged = load_exported(out)
    pixel_values, input_ids = _inputs(AutoTokenizer.from_pretrained(adapter), image_size)
    grid_resized = image_size != (32, 32)  # the tiny checkpoint's native size
    got = _embeddings(peft_model, pixel_values, input_ids, interpolate_pos_encoding=grid_resized)
    expected = _embeddings(merged, pixel_values, input_ids)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for name in ("logit_scale", "logit_bias"):
        torch.testing.assert_close(getattr(peft_model.base_model.model, name), getattr(merged, name))
    assert len(AutoTokenizer.from_pretrained(adapter)) == vocab  # no mask token id past the base vocabulary
    card = (adapter / "README.md").read_text()
    assert metadata_load(adapter / "README.md")["library_name"] == "peft"
    assert ("interpolate_pos_encoding=True" in card) == grid_resized


def test_adapter_is_refused_when_the_run_changed_a_base_weight(tiny_checkpoint, tmp_path, caplog):
    model = _lora_model(tiny_checkpoint, (32, 32))
    with torch.no_grad():
        model.backbone.vision_model.post_layernorm.weight.add_(0.1)  # as if trained besides the adapters
    out = _export_with_adapter(model, tiny_checkpoint, tmp_path / "export", (32, 32))
    assert not (out / "adapter").exists() and (out / "model.safetensors").is_file()
    refusal = "vision_model.post_layernorm.weight (changed from the base checkpoint)"
    assert refusal in caplog.text and "merged export" in caplog.text
    assert refusal in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging leftovers


def test_full_fine_tuning_exports_no_adapter_folder(tiny_checkpoint, tmp_path, caplog):
    caplog.set_level("INFO")
    model = TBPS(load_backbone(tiny_checkpoint)).eval()
    out = _export_with_adapter(model, tiny_checkpoint, tmp_path / "export", (32, 32))
    assert not (out / "adapter").exists()
    assert "no adapter folder" in caplog.text
    assert "full fine-tuning" in (out / "README.md").read_text()


# ---------------------------------------------------------------- model card


RESULTS = {
    "t2i": {"R1": 50.53, "R5": 70.1, "R10": 78.25, "mAP": 45.5, "mINP": 30.0},
    "i2t": {"R1": 60.0, "R5": 80.0, "R10": 85.0, "mAP": 40.0, "mINP": 20.0},
}


def _card(out_dir, base_model, image_size, results=RESULTS, text_attention_mask=False) -> CardFacts:
    recipe = TrainingRecipe(
        fine_tuning="LoRA r 4",
        objective="strategy auxiliary_cross: N-ITC + cross-modal Circle",
        epochs=60,
        checkpoint="epoch12-val_score50.00.ckpt",
        dataset="VN3K_VI",
        languages=("vi",),
        dataset_ids=("VN3K",),
    )
    return CardFacts(str(out_dir), str(base_model), image_size, 16, text_attention_mask, recipe, results)


def _python_block(card_file: Path) -> str:
    (block,) = re.findall(r"```python\n(.*?)```", card_file.read_text(encoding="utf-8"), flags=re.DOTALL)
    return block


def _run_snippet(card_file: Path, folder: Path, monkeypatch, image: Image.Image) -> dict:
    """Run a card's usage code as a user would: in a folder holding its `person.jpg`."""
    folder.mkdir()
    image.save(folder / "person.jpg")
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(_python_block(card_file), str(card_file), "exec"), namespace)  # noqa: S102 - the card's own code
    return namespace


def _person(seed: int, size=(29, 83)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("image_size", "text_attention_mask"), [((32, 32), False), ((48, 16), True)], ids=["square", "rectangular"]
)
def test_model_card_metadata_table_and_usage_code_that_runs(
    tiny_checkpoint, tmp_path, monkeypatch, image_size, text_attention_mask
):
    out_dir = tmp_path / "export"
    model = _lora_model(tiny_checkpoint, image_size)
    facts = _card(out_dir, tiny_checkpoint, image_size, RESULTS, text_attention_mask)
    _export_with_adapter(model, tiny_checkpoint, out_dir, image_size, facts)
    meta = metadata_load(out_dir / "README.md")
    assert meta == {  # no base_model: the hub refuses one that is a local path (test below)
        "library_name": "transformers",
        "pipeline_tag": "zero-shot-image-classification",
        "language": ["vi"],
        "datasets": ["VN3K"],
        "tags": ["text-based-person-search", "image-text-retrieval", "siglip"],
    }
    card = (out_dir / "README.md").read_text()
    assert "| t2i | 50.53 | 70.10 | 78.25 | 45.50 | 30.00 |" in card and "LoRA r 4" in card and "60" in card
    # Every file is a plain visible file an upload takes as it is.
    assert all(not part.startswith(".") for p in out_dir.rglob("*") for part in p.relative_to(out_dir).parts)

    # The usage code of both cards gives evaluation's embeddings: eval transform + CaptionTokenizer + TBPS.
    image = _person(3)
    mask = {"return_attention_mask": text_attention_mask}
    tokens = CaptionTokenizer(AutoTokenizer.from_pretrained(tiny_checkpoint), 16, **mask)([_card_caption(card)])
    for card_file, folder in ((out_dir / "README.md", "merged"), (out_dir / "adapter" / "README.md", "adapter")):
        ran = _run_snippet(card_file, tmp_path / folder, monkeypatch, image)
        decoded = Image.open(tmp_path / folder / "person.jpg").convert("RGB")  # JPEG is lossy: what the code read
        with torch.no_grad():
            expected_image = model.encode_image(build_eval_transform(image_size, MEAN, STD)(decoded)[None])
            expected_text = model.encode_text(tokens["input_ids"], tokens.get("attention_mask"))
        torch.testing.assert_close(ran["image_embeddings"], expected_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(ran["text_embeddings"], expected_text, atol=1e-5, rtol=0)


def _card_caption(card: str) -> str:
    (caption,) = re.findall(r"captions = \['(.*?)'\]", card)
    return caption


def test_card_without_results_says_not_evaluated_and_local_base_is_no_metadata(tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "export"
    facts = _card(out_dir, tiny_checkpoint, (32, 32), results=None)
    _export_with_adapter(_lora_model(tiny_checkpoint, (32, 32)), tiny_checkpoint, out_dir, (32, 32), facts)
    assert "Not evaluated" in (out_dir / "README.md").read_text()
    assert "base_model" not in metadata_load(out_dir / "README.md")  # the hub refuses a base_model that is a path
    assert json.loads((out_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_checkpoint
    )
    hub_base = "google/siglip-base-patch16-256-multilingual"
    assert metadata_load_text(front_matter(CardFacts("m", hub_base, (32, 32), 16), "peft"))["base_model"] == hub_base


def metadata_load_text(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


# ---------------------------------------------------------------- image processor = evaluation transform


@pytest.mark.parametrize("image_size", [(384, 128), (48, 16)])
def test_exported_image_processor_gives_evaluation_pixel_values(tiny_checkpoint, tmp_path, image_size):
    out = _export(_lora_model(tiny_checkpoint, image_size), tiny_checkpoint, tmp_path / "export", image_size)[0]
    processor = AutoImageProcessor.from_pretrained(out)
    evaluation = build_eval_transform(image_size, MEAN, STD)
    # Smaller, larger, square, wide and person-shaped (not 1:3) images; sharp random pixels resample worst.
    for seed, size in enumerate([(29, 83), (180, 500), (33, 33), (400, 300), (128, 384), (64, 128)]):
        image = _person(seed, size)
        pixels = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, evaluation(image), atol=1e-5, rtol=0)
