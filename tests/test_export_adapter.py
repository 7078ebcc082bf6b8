"""The peft adapter folder, the model card and its snippets, and the exported image processor against evaluation."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import metadata_load
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

from data.text import CaptionTokenizer
from data.transforms import build_eval_transform
from model.adapter_export import restore_base_precision, uncarried_weights
from model.backbone import load_backbone
from model.build import store_frozen_linears
from model.export import load_exported
from model.model_card import CardFacts, TrainingRecipe, front_matter
from model.tbps import TBPS
from tests.export_helpers import MEAN, STD, embeddings, export, export_with_adapter, inputs, lora_model

# ---------------------------------------------------------------- adapter folder (peft format)


@pytest.mark.parametrize(
    ("image_size", "grow_vocab"),
    [((32, 32), False), ((48, 16), True)],
    ids=["native-square", "rectangular-with-mask-token-row"],
)
def test_adapter_folder_loads_with_peft_and_reproduces_the_merged_export(
    tiny_checkpoint, tmp_path, image_size, grow_vocab
):
    vocab = len(AutoTokenizer.from_pretrained(tiny_checkpoint))
    model = lora_model(tiny_checkpoint, image_size, text_vocab_size=vocab + 1 if grow_vocab else None)
    out = export_with_adapter(model, tiny_checkpoint, tmp_path / "export", image_size)
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
    pixel_values, input_ids = inputs(AutoTokenizer.from_pretrained(adapter), image_size)
    grid_resized = image_size != (32, 32)  # the tiny checkpoint's native size
    got = embeddings(peft_model, pixel_values, input_ids, interpolate_pos_encoding=grid_resized)
    expected = embeddings(merged, pixel_values, input_ids)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for name in ("logit_scale", "logit_bias"):
        torch.testing.assert_close(getattr(peft_model.base_model.model, name), getattr(merged, name))
    assert len(AutoTokenizer.from_pretrained(adapter)) == vocab  # no mask token id past the base vocabulary
    card = (adapter / "README.md").read_text()
    assert metadata_load(adapter / "README.md")["library_name"] == "peft"
    assert ("interpolate_pos_encoding=True" in card) == grid_resized


def test_adapter_is_refused_when_the_run_changed_a_base_weight(tiny_checkpoint, tmp_path, caplog):
    model = lora_model(tiny_checkpoint, (32, 32))
    with torch.no_grad():
        model.backbone.vision_model.post_layernorm.weight.add_(0.1)  # as if trained besides the adapters
    out = export_with_adapter(model, tiny_checkpoint, tmp_path / "export", (32, 32))
    assert not (out / "adapter").exists() and (out / "model.safetensors").is_file()
    refusal = "vision_model.post_layernorm.weight (changed from the base checkpoint)"
    assert refusal in caplog.text and "merged export" in caplog.text
    assert refusal in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging leftovers


def test_frozen_weights_kept_in_bf16_take_the_base_values_back_and_trained_ones_stay(tiny_checkpoint):
    trained = lora_model(tiny_checkpoint, (32, 32))
    with torch.no_grad():
        trained.backbone.vision_model.post_layernorm.weight.add_(0.1)  # trained besides the adapters
    store_frozen_linears(trained, torch.bfloat16)  # what bf16-mixed training holds, and its checkpoints
    reloaded = lora_model(tiny_checkpoint, (32, 32))  # fp32, as a checkpoint is loaded for export
    reloaded.load_state_dict(trained.state_dict())
    base = SiglipModel.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    changed = uncarried_weights(reloaded.backbone, base, (32, 32))[0]
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight (changed from the base checkpoint)" in changed
    assert restore_base_precision(reloaded.backbone, base) > 0
    base_params = dict(base.named_parameters())
    for name, param in reloaded.backbone.named_parameters():
        plain = name.replace(".base_layer", "")
        if "lora_" in name or plain in ("logit_scale", "logit_bias", "vision_model.post_layernorm.weight"):
            assert torch.equal(param, dict(trained.backbone.named_parameters())[name].float()), name
        else:
            assert torch.equal(param, base_params[plain]), name
    assert uncarried_weights(reloaded.backbone, base, (32, 32))[0] == [
        "vision_model.post_layernorm.weight (changed from the base checkpoint)"
    ]


def test_a_lora_run_trained_in_bf16_mixed_exports_its_adapter(demo_root, tmp_path):
    from prepare_checkpoints import export as export_checkpoint
    from tests.conftest import compose_config, demo_overrides
    from trainer import train

    overrides = ("lora=cir", "++trainer.precision=bf16-mixed", "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    results = train(compose_config("demo", demo_overrides(demo_root, *overrides)), tmp_path / "run")
    out = export_checkpoint(Path(results["best_checkpoint"]), tmp_path / "exported")
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), (out / "README.md").read_text()


def test_full_fine_tuning_exports_no_adapter_folder(tiny_checkpoint, tmp_path, caplog):
    caplog.set_level("INFO")
    model = TBPS(load_backbone(tiny_checkpoint)).eval()
    out = export_with_adapter(model, tiny_checkpoint, tmp_path / "export", (32, 32))
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
    model = lora_model(tiny_checkpoint, image_size)
    facts = _card(out_dir, tiny_checkpoint, image_size, RESULTS, text_attention_mask)
    export_with_adapter(model, tiny_checkpoint, out_dir, image_size, facts)
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
    export_with_adapter(lora_model(tiny_checkpoint, (32, 32)), tiny_checkpoint, out_dir, (32, 32), facts)
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
    out = export(lora_model(tiny_checkpoint, image_size), tiny_checkpoint, tmp_path / "export", image_size)[0]
    processor = AutoImageProcessor.from_pretrained(out)
    evaluation = build_eval_transform(image_size, MEAN, STD)
    # Smaller, larger, square, wide and person-shaped (not 1:3) images; sharp random pixels resample worst.
    for seed, size in enumerate([(29, 83), (180, 500), (33, 33), (400, 300), (128, 384), (64, 128)]):
        image = _person(seed, size)
        pixels = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, evaluation(image), atol=1e-5, rtol=0)
