"""The tiny checkpoint loads through the real loader; rectangular inputs; captions tokenise as SigLIP expects."""

import unicodedata

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, SiglipModel

from data.text import CaptionTokenizer, normalize_caption
from model.backbone import CheckpointError, load_backbone
from model.tbps import TBPS, HeadSpec

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "spiece.model",
    "tokenizer_config.json",
    "preprocessor_config.json",
}


def test_tiny_checkpoint_has_the_hugging_face_layout(tiny_checkpoint):
    assert EXPECTED_FILES <= {p.name for p in tiny_checkpoint.iterdir()}
    assert isinstance(AutoModel.from_pretrained(tiny_checkpoint), SiglipModel)
    assert type(AutoTokenizer.from_pretrained(tiny_checkpoint)).__name__ == "SiglipTokenizer"


def test_rectangular_inputs_interpolate_the_position_grid_once(tiny_checkpoint):
    model = load_backbone(tiny_checkpoint, image_size=(48, 16))
    embeddings = model.vision_model.embeddings
    assert embeddings.position_embedding.weight.shape[0] == (48 // 8) * (16 // 8)
    out = model.get_image_features(pixel_values=torch.randn(2, 3, 48, 16)).pooler_output
    assert out.shape == (2, 32)


def test_native_size_keeps_the_checkpoint_weights(tiny_checkpoint):
    reference = AutoModel.from_pretrained(tiny_checkpoint).vision_model.embeddings.position_embedding.weight
    loaded = load_backbone(tiny_checkpoint, image_size=(32, 32)).vision_model.embeddings.position_embedding.weight
    torch.testing.assert_close(loaded, reference)


def test_image_size_must_be_divisible_by_the_patch(tiny_checkpoint):
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        load_backbone(tiny_checkpoint, image_size=(50, 16))


def test_missing_model_directory_and_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_backbone(tmp_path)


def test_unknown_config_override_is_rejected(tiny_checkpoint):
    with pytest.raises(ValueError, match="no field 'dropout_rate'"):
        load_backbone(tiny_checkpoint, text_config_overrides={"dropout_rate": 0.1})


def test_nfc_and_nfd_captions_tokenise_identically(tiny_checkpoint):
    tokenizer = CaptionTokenizer.from_pretrained(tiny_checkpoint, 16)
    nfc = "Người phụ nữ mặc áo dài màu đỏ"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    torch.testing.assert_close(tokenizer([nfc])["input_ids"], tokenizer([nfd])["input_ids"])
    assert normalize_caption(nfd) == nfc


def test_captions_are_right_padded_so_the_pooled_position_is_end_of_sentence(tiny_checkpoint):
    tokenizer = CaptionTokenizer.from_pretrained(tiny_checkpoint, 16)
    long = "mặc áo sơ mi trắng quần jean xanh đeo ba lô đỏ " * 5
    ids = tokenizer(["áo trắng", long])["input_ids"]
    eos = tokenizer.tokenizer.eos_token_id
    assert ids.shape == (2, 16)
    assert (ids[:, -1] == eos).all()  # SigLIP pools the last position: always </s>, short or truncated
    assert ids[0, 0] != eos  # right padding: text first
    assert "attention_mask" not in tokenizer(["a"])
    assert "attention_mask" in CaptionTokenizer.from_pretrained(tiny_checkpoint, 16, return_attention_mask=True)(["a"])


def test_tbps_embeddings_are_normalised_and_forward_encodes_views(tiny_checkpoint):
    model = TBPS(load_backbone(tiny_checkpoint, image_size=(32, 16)), HeadSpec(simclr=True))
    batch = {
        "images": torch.randn(4, 3, 32, 16),
        "aug_images": torch.randn(4, 3, 32, 16),
        "ss_images1": torch.randn(4, 3, 32, 16),
        "ss_images2": torch.randn(4, 3, 32, 16),
        "caption_input_ids": torch.randint(0, 50, (4, 16)),
        "pids": torch.tensor([0, 0, 1, 2]),
    }
    feats = model(batch, aug_view=True, ss_views=True)
    for tensor in (feats.image_feats, feats.text_feats, feats.aug_image_feats):
        torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(4))
    assert feats.ss_feats_a.shape == (4, 32)
    # The joint vision pass equals separate passes.
    torch.testing.assert_close(feats.aug_image_feats, model.encode_image(batch["aug_images"]), atol=1e-5, rtol=1e-5)
    assert feats.logit_scale.item() == pytest.approx(10.0, rel=1e-5)


def test_freezing_a_tower(tiny_checkpoint):
    model = TBPS(load_backbone(tiny_checkpoint), freeze_vision=True)
    assert not any(p.requires_grad for p in model.backbone.vision_model.parameters())
    assert all(p.requires_grad for p in model.backbone.text_model.parameters())


def test_clip_backbone_interpolates_positions_per_call_at_non_native_sizes(tiny_clip_checkpoint):
    from model.backbone import needs_per_call_interpolation

    backbone = load_backbone(tiny_clip_checkpoint, image_size=(48, 16))
    assert needs_per_call_interpolation(backbone, (48, 16)) and not needs_per_call_interpolation(backbone, (32, 32))
    model = TBPS(backbone, interpolate_pos_encoding=True)
    assert model.encode_image(torch.randn(2, 3, 48, 16)).shape == (2, 32)
    assert model.logit_bias.item() == 0.0  # CLIP has no bias


def test_random_word_deletion_keeps_a_string_and_at_least_one_word():
    import random

    from data.text import random_deletion

    rng = random.Random(0)
    assert random_deletion("áo", 0.9, rng) == "áo"  # the seed returned a list here
    assert random_deletion("áo trắng quần đen", 0.0, rng) == "áo trắng quần đen"
    outputs = [random_deletion("một người mặc áo trắng và quần đen", 0.99, rng) for _ in range(50)]
    assert all(isinstance(o, str) and o for o in outputs)
    shorter = [random_deletion("một người mặc áo trắng và quần đen", 0.3, rng) for _ in range(50)]
    assert any(len(o.split()) < 8 for o in shorter) and all(
        set(o.split()) <= set("một người mặc áo trắng và quần đen".split()) for o in shorter
    )
