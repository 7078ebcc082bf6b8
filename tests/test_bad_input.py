"""Every kind of bad input of issue 7 gives one clear InputError naming the file or field and the fix.

One test (or one parametrised table) per case, numbered as in the issue, so the whole list reads in one place:

 1. missing dataset folder / image folder / annotation file   7. unknown dataset, strategy, loss flag, optimizer
 2. malformed JSON annotation                                  8. malformed img_size_str, size not a patch multiple
 3. record missing id / captions / path key, or wrong types    9. LoRA target modules that match nothing
 4. image file missing or unreadable (fail / skip policies)   10. broken checkpoint folder, tokenizer, vocabulary
 5. empty caption                                             11. ckpt_path that does not exist
 6. query whose identity has no gallery image              12. damaged files handed to export and search

`trainer.py` turns every InputError into one logged line and exit status 2. Deeper variants of cases 1-3, 5 live in
test_readers.py, of 8 in test_configs.py, of 9 in test_lora.py and of 10 in test_backbone.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from data.check import check_dataset
from data.datasets import ImageNotFoundError, ImageReadError, load_rgb
from data.images import check_images
from data.readers import DatasetFormatError, DatasetNotFoundError, EvalSplit, read_dataset
from data.text import CaptionTokenizer, TokenizerError
from model.backbone import BackboneConfigError, CheckpointError, image_size_problems, load_backbone
from model.lora import LoraConfigError, LoraSettings, apply_lora
from tests.conftest import compose_config, demo_overrides
from tests.test_readers import standard_records, write_dataset
from utils.config import ConfigError, ImageSizeError, parse_img_size
from utils.errors import InputError
from utils.metrics import NoRelevantGalleryError, rank_metrics


def expect(error: pytest.ExceptionInfo, kind: type[InputError], *needles: str) -> str:
    """Assert the error is an InputError of `kind` whose message contains every needle; return the message.

    Single errors must be one line (ConfigError lists one problem per line by design).
    """
    assert isinstance(error.value, InputError) and isinstance(error.value, kind), repr(error.value)
    message = str(error.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if not isinstance(error.value, ConfigError):
        assert "\n" not in message, message
    return message


def validation_error(*overrides: str) -> str:
    """The message of the ConfigError that `trainer.validate_config` raises for the demo config plus `overrides`."""
    from trainer import validate_config

    with pytest.raises(InputError) as error:
        validate_config(compose_config("demo", list(overrides)))
    return expect(error, ConfigError)


# ---------------------------------------------------------------- 1. missing dataset folder / imgs / annotation
def test_1_missing_dataset_folder_image_folder_and_annotation(tmp_path: Path) -> None:
    folder = tmp_path / "VN3K"
    with pytest.raises(InputError) as error:
        read_dataset("VN3K_VI", tmp_path)
    expect(error, DatasetNotFoundError, f"dataset folder {folder} not found", "data_captions.json", "point the")
    folder.mkdir()
    with pytest.raises(InputError) as error:
        read_dataset("VN3K_VI", tmp_path)
    expect(error, DatasetNotFoundError, f"image folder {folder / 'imgs'} not found", "put the VN3K_VI images there")
    (folder / "imgs").mkdir()
    with pytest.raises(InputError) as error:
        read_dataset("VN3K_VI", tmp_path)
    expect(error, DatasetNotFoundError, f"annotation file {folder / 'data_captions.json'} not found")


# ---------------------------------------------------------------- 2. malformed JSON
@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('[\n{"id": 1,\n "file_path": "a.png" "split": "train"}\n]', ("invalid JSON at line 3", "fix the file")),
        ('{"images": []}', ("top level must be a JSON list", "got dict")),
        (b"[\xff\xfe]", ("not UTF-8", "re-save the file as UTF-8")),
    ],
    ids=["syntax", "not-a-list", "not-utf8"],
)
def test_2_malformed_json_names_the_file(tmp_path: Path, content: str | bytes, needles: tuple[str, ...]) -> None:
    annotation = write_dataset(tmp_path, "VN3K_VI", [])
    if isinstance(content, bytes):
        annotation.write_bytes(content)
    else:
        annotation.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as error:
        read_dataset("VN3K_VI", tmp_path)
    expect(error, DatasetFormatError, str(annotation), *needles)


# ---------------------------------------------------------------- 3. record missing a key, or with a wrong type
def _without(key: str) -> Any:
    return lambda record: {k: v for k, v in record.items() if k != key}


def _with(key: str, value: Any) -> Any:
    return lambda record: {**record, key: value}


@pytest.mark.parametrize(
    ("name", "corrupt", "needle"),
    [
        ("CUHK-PEDES", _without("id"), "missing key 'id'"),
        ("CUHK-PEDES", _without("captions"), "missing key 'captions'"),
        ("CUHK-PEDES", _without("file_path"), "missing key 'file_path'"),
        ("RSTPReid", _without("img_path"), "missing key 'img_path'"),
        ("CUHK-PEDES", _with("id", "seven"), "key 'id' must be a person id number, got str"),
        ("CUHK-PEDES", _with("captions", "a man"), "key 'captions' must be list, got str"),
        ("CUHK-PEDES", _with("file_path", 12), "key 'file_path' must be str, got int"),
    ],
)
def test_3_bad_record_names_file_record_and_key(tmp_path: Path, name: str, corrupt: Any, needle: str) -> None:
    records = standard_records(name)
    records[3] = corrupt(records[3])
    annotation = write_dataset(tmp_path, name, records)
    with pytest.raises(InputError) as error:
        read_dataset(name, tmp_path)
    message = expect(error, DatasetFormatError, str(annotation), "record 3", needle)
    assert "fix it, or set dataset.bad_records=skip" in message


# ---------------------------------------------------------------- 4. image missing or unreadable
@pytest.fixture
def vn3k(tmp_path: Path) -> Path:
    """A small VN3K_VI dataset: train ids 7, 3, 11; validation id 60; test ids 50 (two images) and 51."""
    write_dataset(tmp_path, "VN3K_VI", standard_records("VN3K_VI"))
    return tmp_path


def test_4_fail_policy_names_the_first_missing_image_and_the_count(vn3k: Path) -> None:
    images = vn3k / "VN3K" / "imgs"
    (images / "p3/a.png").unlink()
    (images / "t51/a.png").unlink()
    with pytest.raises(InputError) as error:
        check_images(read_dataset("VN3K_VI", vn3k), "fail")
    expect(error, ImageNotFoundError, f"image {images / 'p3/a.png'} not found", "2 of the 8 images", "bad_images=skip")
    status, detail = check_dataset("VN3K_VI", vn3k)  # setup.sh's dataset check reports it too
    assert status == "malformed" and str(images / "p3/a.png") in detail


def test_4_fail_policy_passes_a_complete_dataset_unchanged(vn3k: Path) -> None:
    splits = read_dataset("VN3K_VI", vn3k)
    assert check_images(splits, "fail") == (splits, 0)


def test_4_load_rgb_names_a_missing_or_undecodable_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        load_rgb(tmp_path / "nope.png")
    expect(error, ImageNotFoundError, str(tmp_path / "nope.png"), "bad_images=skip")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError) as error:
        load_rgb(broken)
    expect(error, ImageReadError, f"cannot read image {broken}", "fix the file")


def test_4_skip_policy_drops_and_counts_bad_images_and_orphaned_queries(
    vn3k: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = vn3k / "VN3K" / "imgs"
    (images / "p3/a.png").unlink()  # identity 3 loses its only training image
    (images / "p7/b.png").write_bytes(b"not an image")  # identity 7 keeps p7/a
    (images / "t50/a.png").unlink()  # identity 50 keeps t50/b in the gallery
    (images / "t51/a.png").write_bytes(b"GIF89a broken")  # identity 51 has no gallery image left
    splits = read_dataset("VN3K_VI", vn3k)
    with caplog.at_level(logging.WARNING, logger="data.images"):
        checked, dropped = check_images(splits, "skip")
    assert dropped == 4
    # Training: p7/a and p11/a remain, pids remapped to stay contiguous (7 -> 0, 11 -> 1).
    assert sorted({(s.pid, s.image_path.name, s.image_path.parent.name) for s in checked.train}) == [
        (0, "a.png", "p7"),
        (1, "a.png", "p11"),
    ]
    assert checked.num_train_ids == 2
    # Test: the gallery keeps t50/b; every caption of person 50 stays a query, those of 51 are dropped.
    assert checked.test.image_paths == [images / "t50/b.png"] and checked.test.image_pids == [50]
    assert set(checked.test.caption_pids) == {50} and len(checked.test.captions) == 4
    assert checked.val == splits.val
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "dropped 4 missing or unreadable images" in warning and "2 queries" in warning
    assert str(images / "p3/a.png") in warning


def test_4_skip_policy_drops_a_truncated_jpeg_that_verify_alone_accepts(tmp_path: Path) -> None:
    from PIL import Image

    from data.images import is_readable

    path = tmp_path / "cut.jpg"
    Image.effect_noise((64, 128), 50).convert("RGB").save(path, quality=95)
    assert is_readable(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut in half
    assert not is_readable(path)


def test_4_skip_policy_refuses_to_empty_a_split_and_unknown_policies_are_config_errors(vn3k: Path) -> None:
    for path in (vn3k / "VN3K" / "imgs").glob("t5*/*.png"):
        path.unlink()
    with pytest.raises(InputError) as error:
        check_images(read_dataset("VN3K_VI", vn3k), "skip")
    expect(error, ImageReadError, "test split of VN3K_VI", "bad_images")
    with pytest.raises(InputError) as error:
        check_images(read_dataset("VN3K_VI", vn3k), "ignore")
    expect(error, ConfigError, "dataset.bad_images='ignore'", "['fail', 'skip']")


# ---------------------------------------------------------------- 5. empty caption
@pytest.mark.parametrize("caption", ["", "   \t"])
def test_5_empty_caption_names_file_record_and_caption(tmp_path: Path, caption: str) -> None:
    records = standard_records("VN3K_VI")
    records[2]["captions"] = ["a person in red", caption]
    annotation = write_dataset(tmp_path, "VN3K_VI", records)
    with pytest.raises(InputError) as error:
        read_dataset("VN3K_VI", tmp_path)
    expect(error, DatasetFormatError, str(annotation), "record 2 (id=3)", "item 1 must be a non-empty caption", "fix")


# ---------------------------------------------------------------- 6. query identity without a gallery image
def test_6_query_identity_without_gallery_image() -> None:
    # A reader cannot produce this (each record gives the gallery its image and the queries its captions); splits
    # built afterwards are checked when constructed, and `check_images(skip)` drops such queries (case 4).
    with pytest.raises(InputError) as error:
        EvalSplit(image_pids=[1, 2], image_paths=[Path("a"), Path("b")], caption_pids=[1, 4], captions=["x", "y"])
    expect(error, DatasetFormatError, "query pids [4]", "no gallery image", "remove those captions")
    with pytest.raises(InputError) as error:
        rank_metrics(torch.rand(2, 2), torch.tensor([1, 4]), torch.tensor([1, 2]), ks=(1,))
    expect(error, NoRelevantGalleryError, "pids [4]")


# ---------------------------------------------------------------- 7. unknown names in the config
@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("dataset.dataset_name=MARKET", ("dataset.dataset_name='MARKET' is unknown", "VN3K_VI")),
        ("loss.strategy=mystery", ("loss.strategy='mystery' is unknown", "baseline")),
        ("+loss.FOO=true", ("Unknown loss setting(s) ['FOO']", "valid keys")),
        ("optimizer.type=torch.optim.Adagrad", ("optimizer.type='torch.optim.Adagrad' is unknown", "AdamW")),
    ],
    ids=["dataset", "strategy", "loss-flag", "optimizer"],
)
def test_7_unknown_dataset_strategy_loss_flag_optimizer(override: str, needles: tuple[str, ...]) -> None:
    message = validation_error(override)
    assert all(needle in message for needle in needles), message


# ---------------------------------------------------------------- 8. image size
@pytest.mark.parametrize("text", ["(64,)", "64x32", "(0, 32)", "(6.4, 32)"])
def test_8_malformed_img_size_str(text: str) -> None:
    with pytest.raises(InputError) as error:
        parse_img_size(text)
    expect(error, ImageSizeError, f"img_size_str={text!r}", "(384,128)")
    assert f"img_size_str={text!r}" in validation_error(f"img_size_str='{text}'")


def test_8_image_size_not_divisible_by_the_patch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # Config time: the patch size comes from the checkpoint's config.json (8 here), or from backbone.tiny before the
    # tiny checkpoint is built.
    (problem,) = image_size_problems(tiny_checkpoint, (60, 32))
    assert "60x32 is not divisible by the patch size 8" in problem and "img_size_str='(56,32)'" in problem
    assert str(tiny_checkpoint) in problem
    assert image_size_problems(tiny_checkpoint, (64, 32)) == []
    assert image_size_problems(tmp_path / "not_built_yet", (64, 30), patch_size=8) != []
    assert image_size_problems(tmp_path / "not_built_yet", (64, 30)) == []  # unknown patch: checked at load
    # Load time.
    with pytest.raises(InputError) as error:
        load_backbone(tiny_checkpoint, image_size=(60, 32))
    expect(error, ImageSizeError, "not divisible by the patch size 8", "img_size_str")


# ---------------------------------------------------------------- 9. LoRA targets that match nothing
def test_9_lora_target_modules_matching_nothing_lists_real_modules(tiny_checkpoint: Path) -> None:
    pattern = r".*\.attention\.query"
    with pytest.raises(InputError) as error:
        apply_lora(load_backbone(tiny_checkpoint), LoraSettings(r=2, target_modules=pattern))
    message = expect(error, LoraConfigError, "lora.target_modules", pattern, "matches no adaptable Linear layer")
    assert "text_model.encoder.layers.N.self_attn.q_proj" in message and "mlp.fc1" in message
    with pytest.raises(InputError) as error:
        LoraSettings.from_mapping({"rank": 8})
    expect(error, LoraConfigError, "Unknown lora config keys ['rank']", "'r'")


# ---------------------------------------------------------------- 10. checkpoint folder, tokenizer and vocabulary
def _copy_with(source: Path, target: Path, name: str, content: bytes | None) -> Path:
    shutil.copytree(source, target)
    if content is None:
        (target / name).unlink()
    else:
        (target / name).write_bytes(content)
    return target


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("model.safetensors", None, "is missing model.safetensors"),
        ("config.json", None, "is missing config.json"),
        ("config.json", b"{not json", "unusable config.json"),
        ("model.safetensors", b"junk", "unreadable weights"),
    ],
    ids=["no-weights", "no-config", "bad-config", "bad-weights"],
)
def test_10_broken_checkpoint_folder(
    tiny_checkpoint: Path, tmp_path: Path, name: str, content: bytes | None, needle: str
) -> None:
    broken = _copy_with(tiny_checkpoint, tmp_path / "ckpt", name, content)
    with pytest.raises(InputError) as error:
        load_backbone(broken)
    expect(error, CheckpointError, str(broken), needle, "prepare_checkpoints.py")


def test_10_missing_checkpoint_folder_and_unknown_override(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        load_backbone(tmp_path / "nowhere")
    expect(error, CheckpointError, f"{tmp_path / 'nowhere'} does not exist", "backbone.path")
    with pytest.raises(InputError) as error:
        load_backbone(tiny_checkpoint, text_config_overrides={"dropout_rate": 0.1})
    expect(error, BackboneConfigError, "backbone.text_config.dropout_rate", "remove the override")


@pytest.mark.parametrize(
    ("name", "content"),
    [("spiece.model", b"garbage"), ("spiece.model", None), ("tokenizer_config.json", b"{bad")],
    ids=["corrupt-spm", "no-spm", "bad-config"],
)
def test_10_broken_tokenizer_folder(tiny_checkpoint: Path, tmp_path: Path, name: str, content: bytes | None) -> None:
    broken = _copy_with(tiny_checkpoint, tmp_path / "tok", name, content)
    with pytest.raises(InputError) as error:
        CaptionTokenizer.from_pretrained(broken, 16)
    expect(error, TokenizerError, f"Cannot load the tokenizer in {broken}", "tokenizer.pretrained_model_name_or_path")


def test_10_missing_tokenizer_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        CaptionTokenizer.from_pretrained(tmp_path / "nowhere", 16)
    expect(error, TokenizerError, f"Tokenizer folder {tmp_path / 'nowhere'} does not exist", "prepare_checkpoints")


def test_10_tokenizer_larger_than_the_text_embedding(tiny_checkpoint: Path, demo_root: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trainer import train

    bigger = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    bigger.add_tokens(["áo_dài", "nón_lá"])
    bigger.save_pretrained(tmp_path / "bigger_tokenizer")
    cfg = compose_config(
        "demo",
        demo_overrides(
            demo_root,
            f"backbone.path={tiny_checkpoint}",
            f"tokenizer.pretrained_model_name_or_path={tmp_path / 'bigger_tokenizer'}",
            "img_size_str='(32,32)'",
            "dataset.batch_size=2",
            "dataset.num_instance=1",
        ),
    )
    with pytest.raises(InputError) as error:
        train(cfg, tmp_path / "run")
    expect(error, ConfigError, f"has {len(bigger)} tokens but the text tower embeds {len(bigger) - 2}", "tokenizer")
    assert not (tmp_path / "run" / "results.json").exists()


# ---------------------------------------------------------------- 11. ckpt_path that does not exist
def test_11_missing_ckpt_path_when_training_and_when_evaluating(tmp_path: Path) -> None:
    from trainer import evaluate

    missing = tmp_path / "runs" / "last.ckpt"
    assert f"ckpt_path='{missing}' does not exist" in validation_error(f"ckpt_path={missing}")
    with pytest.raises(InputError) as error:
        evaluate(compose_config("demo", ["train=false", f"ckpt_path={missing}"]), tmp_path)
    expect(error, ConfigError, f"ckpt_path='{missing}' does not exist", "last.ckpt")
    with pytest.raises(InputError) as error:
        evaluate(compose_config("demo", ["train=false"]), tmp_path)
    expect(error, ConfigError, "evaluation (train=false) needs ckpt_path=")


def test_11_unreadable_ckpt_path_when_training_and_when_evaluating(tmp_path: Path) -> None:
    from trainer import evaluate

    truncated = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])  # a copy cut short by a crash
    assert f"ckpt_path='{truncated}' is not a readable checkpoint" in validation_error(f"ckpt_path={truncated}")
    with pytest.raises(InputError) as error:
        evaluate(compose_config("demo", ["train=false", f"ckpt_path={truncated}"]), tmp_path)
    expect(error, ConfigError, "is not a readable checkpoint", "written by trainer.py")


# ---------------------------------------------------------------- 12. damaged files handed to export and search
@pytest.mark.parametrize("image_size", [(32, 32), (48, 16)], ids=["square", "rectangular"])
def test_12_a_truncated_export_names_its_weights_file(tiny_checkpoint: Path, tmp_path: Path, image_size) -> None:
    from model.backbone import CheckpointError
    from model.export import WEIGHTS_FILE, load_exported
    from tests.export_helpers import export, lora_model

    out, _ = export(lora_model(tiny_checkpoint, image_size), tiny_checkpoint, tmp_path / "export", image_size)
    weights = out / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(InputError) as error:
        load_exported(out)
    expect(error, CheckpointError, f"{weights} cannot be read", "export the checkpoint again")


def test_12_a_truncated_or_foreign_checkpoint_is_one_line_in_export_and_search(tmp_path: Path) -> None:
    from prepare_checkpoints import export
    from search_app.encoder import ModelSourceError, load_encoder

    whole = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(SystemExit, match=f"--export {truncated} is not a readable checkpoint .*trainer.py"):
        export(truncated, tmp_path / "out")
    with pytest.raises(InputError) as error:
        load_encoder(truncated, device=torch.device("cpu"))
    expect(error, ModelSourceError, f"--model {truncated} is not a readable checkpoint", "exported folder")
    with pytest.raises(SystemExit, match=f"--export {whole} is not a TBPS checkpoint .*hyper_parameters"):
        export(whole, tmp_path / "new")
    with pytest.raises(InputError) as error:
        load_encoder(whole, device=torch.device("cpu"))
    expect(error, ModelSourceError, f"--model {whole} is not a TBPS checkpoint", "written by `trainer.py`")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'out'} already exists; choose a new folder"):
        export(whole, tmp_path / "out")  # refused before the checkpoint is loaded


def test_12_a_query_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    from search_app.manifest import SearchIndexError
    from search_app.query import read_queries

    latin = tmp_path / "queries.txt"
    latin.write_bytes("chemise blanche, café\n".encode("latin-1"))  # a legacy editor's encoding
    with pytest.raises(InputError) as error:
        read_queries([], latin)
    expect(error, SearchIndexError, f"query file {latin} is not UTF-8", "save it as UTF-8")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffáo trắng\nquần đen\n".encode())
    assert read_queries([], bom) == ["áo trắng", "quần đen"]
