"""Model cards (`README.md`) for exported folders: Hugging Face metadata, the training recipe, the test table, usage.

The front matter is the YAML block the hub reads (`base_model`, `library_name`, `pipeline_tag`, `language`,
`datasets`, `tags`); `huggingface-cli upload DIR` publishes a folder as it is. `base_model` is written only when it is
a hub id (`owner/name`): the hub rejects a card whose `base_model` names no model, e.g. a local folder. No `license`
is written: it depends on the base model's and the dataset's, which the run does not know.

The usage snippets are plain transformers / peft code; `tests/test_export.py` runs them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CARD_FILE = "README.md"
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
EXAMPLE_CAPTIONS = {
    "vi": "một người phụ nữ mặc áo sơ mi trắng và quần đen, đeo túi đỏ",
    "en": "a woman in a white shirt and black trousers, carrying a red bag",
}


@dataclass(frozen=True)
class TrainingRecipe:
    """How the exported model was trained, as the card reports it.

    Attributes:
        fine_tuning: e.g. "LoRA r 32, alpha 64, ..." or "full fine-tuning".
        objective: The trained loss terms (`Objective.describe()`).
        epochs: `trainer.max_epochs`.
        checkpoint: The exported checkpoint's file name (its epoch and validation score when selected on validation).
        dataset: `dataset.dataset_name`.
        languages: ISO 639-1 codes of the training captions.
        dataset_ids: Names for the card's `datasets` field (empty for generated data).
        details: Further recipe lines (optimizer, batch, ...), shown as they are.
    """

    fine_tuning: str
    objective: str
    epochs: int
    checkpoint: str
    dataset: str
    languages: tuple[str, ...]
    dataset_ids: tuple[str, ...] = ()
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class CardFacts:
    """What every card of one export shares.

    Attributes:
        model_id: How the snippets name the merged folder (the path given to the export).
        base_model: The checkpoint fine-tuned (a hub id or a local folder).
        image_size: Input (height, width).
        text_length: Tokens per caption (captions are padded to it: SigLIP pools the last position).
        text_attention_mask: Whether training masked text pads.
        recipe: The training recipe, or None when unknown.
        test_results: `{"t2i": {"R1": ...}, "i2t": {...}}` of the exported checkpoint, or None when not evaluated.
        tags: Extra hub tags.
    """

    model_id: str
    base_model: str
    image_size: tuple[int, int]
    text_length: int
    text_attention_mask: bool = False
    recipe: TrainingRecipe | None = None
    test_results: Mapping[str, Mapping[str, float]] | None = None
    tags: tuple[str, ...] = field(default=("text-based-person-search", "image-text-retrieval", "siglip"))


def front_matter(facts: CardFacts, library: str, extra_tags: Sequence[str] = ()) -> str:
    """The YAML metadata block of a card."""
    meta: dict[str, object] = {}
    if HUB_ID.fullmatch(facts.base_model) and not Path(facts.base_model).exists():
        meta["base_model"] = facts.base_model
    meta["library_name"] = library
    meta["pipeline_tag"] = "zero-shot-image-classification"
    if facts.recipe is not None:
        meta["language"] = list(facts.recipe.languages)
        if facts.recipe.dataset_ids:
            meta["datasets"] = list(facts.recipe.dataset_ids)
    meta["tags"] = [*facts.tags, *extra_tags]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def results_markdown(results: Mapping[str, Mapping[str, float]] | None) -> str:
    """The test table (percent), or a line saying the checkpoint was not evaluated."""
    if not results:
        return "Not evaluated: no `results.json` of this checkpoint's run was found next to it.\n"
    lines = ["| Task | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for task in ("t2i", "i2t"):
        if task in results:
            lines.append(f"| {task} | " + " | ".join(f"{float(results[task][m]):.2f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def recipe_markdown(facts: CardFacts) -> str:
    """The training recipe as a bullet list."""
    height, width = facts.image_size
    recipe = facts.recipe
    if recipe is None:
        return f"- Input: {height}x{width} (height x width)\n- Training recipe: not recorded.\n"
    lines = [
        f"- Base model: `{facts.base_model}`",
        f"- Fine-tuning: {recipe.fine_tuning}",
        f"- Objective: {recipe.objective}",
        f"- Data: {recipe.dataset} (captions: {', '.join(recipe.languages)})",
        f"- Input: {height}x{width} (height x width); captions NFC-normalised and padded to {facts.text_length} tokens",
        f"- Epochs: {recipe.epochs}; exported checkpoint: `{recipe.checkpoint}`",
        *(f"- {line}" for line in recipe.details),
    ]
    return "\n".join(lines) + "\n"


def _caption(facts: CardFacts) -> str:
    languages = facts.recipe.languages if facts.recipe else ()
    return EXAMPLE_CAPTIONS["vi" if "vi" in languages else "en"]


def _encode_lines(facts: CardFacts, processor_id: str, interpolate: bool) -> str:
    """The snippet's common part: tokenise like training, preprocess like evaluation, embed, rank."""
    vision_kwargs = ", interpolate_pos_encoding=True" if interpolate else ""
    mask = ', attention_mask=texts["attention_mask"]' if facts.text_attention_mask else ""
    return f"""
captions = [{_caption(facts)!r}]
images = [Image.open(path).convert("RGB") for path in ["person.jpg"]]  # your person crops

tokenizer = AutoTokenizer.from_pretrained({processor_id})
processor = AutoImageProcessor.from_pretrained({processor_id})  # with torchvision installed: evaluation's resize
texts = tokenizer(
    [" ".join(unicodedata.normalize("NFC", caption).split()) for caption in captions],
    padding="max_length", max_length={facts.text_length}, truncation=True, return_tensors="pt",
)
pixels = processor(images, return_tensors="pt")
with torch.no_grad():
    image_embeddings = model.get_image_features(pixel_values=pixels["pixel_values"]{vision_kwargs}).pooler_output
    text_embeddings = model.get_text_features(input_ids=texts["input_ids"]{mask}).pooler_output
image_embeddings = torch.nn.functional.normalize(image_embeddings, dim=-1)
text_embeddings = torch.nn.functional.normalize(text_embeddings, dim=-1)
ranking = (text_embeddings @ image_embeddings.T).argsort(dim=1, descending=True)  # per caption, best image first
"""


def merged_snippet(facts: CardFacts, grid: Sequence[int] | None, interpolate: bool) -> str:
    """Python code that loads the merged folder with transformers alone and ranks images for a caption."""
    if grid is None:
        load = f"""model_id = {facts.model_id!r}  # this folder, or its hub id once uploaded
model = AutoModel.from_pretrained(model_id).eval()
"""
        imports = "from transformers import AutoImageProcessor, AutoModel, AutoTokenizer"
    else:
        load = f"""model_id = {facts.model_id!r}  # a local folder (a hub copy: huggingface_hub.snapshot_download)
# A non-square input has a non-square position grid, which SiglipVisionConfig cannot describe: build the model,
# give it the trained grid recorded in the config, then load the weights.
config = AutoConfig.from_pretrained(model_id)
rows, cols = config.vision_config.tbps_position_grid
model = AutoModel.from_config(config)
embeddings = model.vision_model.embeddings
embeddings.position_embedding = torch.nn.Embedding(rows * cols, config.vision_config.hidden_size)
embeddings.position_ids = torch.arange(rows * cols).unsqueeze(0)
load_model(model, f"{{model_id}}/model.safetensors")
model.eval()
"""
        imports = (
            "from safetensors.torch import load_model\n"
            "from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer"
        )
    header = f"import unicodedata\n\nimport torch\nfrom PIL import Image\n{imports}\n\n"
    return header + load + _encode_lines(facts, "model_id", interpolate)


def adapter_snippet(facts: CardFacts, adapter_id: str, interpolate: bool) -> str:
    """Python code that puts the adapter on the base model with peft and ranks images for a caption."""
    load = f"""base_id = {facts.base_model!r}
adapter_id = {adapter_id!r}  # this folder (on the hub: the repository, with subfolder="adapter" where it sits there)
model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_id), adapter_id).eval()
"""
    header = (
        "import unicodedata\n\nimport torch\nfrom peft import PeftModel\nfrom PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModel, AutoTokenizer\n\n"
    )
    return header + load + _encode_lines(facts, "adapter_id", interpolate)


def _usage_notes(interpolate: bool) -> str:
    notes = [
        "Embeddings are L2-normalised and compared by cosine, as in evaluation.",
        "Captions are NFC-normalised and padded to the full text length on the right: SigLIP pools the last "
        "position, so the padding is part of the model's input.",
        "`AutoImageProcessor` gives the evaluation's pixel values exactly when torchvision is installed (transformers' "
        'default backend); `backend="pil"` resizes with PIL, a few grey levels apart.',
    ]
    if interpolate:
        notes.append(
            "`interpolate_pos_encoding=True` rebuilds the position grid of the non-native input size exactly as "
            "training did (the grid was not trained)."
        )
    return "".join(f"- {note}\n" for note in notes)


def merged_card(facts: CardFacts, *, grid: Sequence[int] | None, interpolate: bool, adapter_line: str) -> str:
    """The card of the merged folder.

    Args:
        facts: The export's facts.
        grid: The (rows, cols) position grid of a rectangular SigLIP export, else None.
        interpolate: Whether image calls need `interpolate_pos_encoding=True` (CLIP at a non-native size).
        adapter_line: One sentence about the adapter folder (where it is, or why there is none).
    """
    height, width = facts.image_size
    return (
        front_matter(facts, "transformers")
        + f"""
# Text-based person search model ({height}x{width})

A dual encoder fine-tuned for text-based person search: a caption (any language of the training data) ranks a
gallery of pedestrian photos. Merged weights (any LoRA adapter folded in), tokenizer and image processor.
{adapter_line}

## Training

{recipe_markdown(facts)}
## Test results (%)

{results_markdown(facts.test_results)}
## Usage

```python
{merged_snippet(facts, grid, interpolate)}```

{_usage_notes(interpolate)}"""
    )


def adapter_card(facts: CardFacts, *, adapter_id: str, interpolate: bool) -> str:
    """The card of the adapter folder (LoRA weights in peft's format, tokenizer and image processor)."""
    return (
        front_matter(facts, "peft", ("lora",))
        + f"""
# LoRA adapter for `{facts.base_model}`

The LoRA adapter of this run in peft's format, with the learned logit scale and bias, the tokenizer and the image
processor. Put it on the base model with `PeftModel.from_pretrained`; it reproduces the merged model one folder up.

## Training

{recipe_markdown(facts)}
## Test results (%)

{results_markdown(facts.test_results)}
## Usage

```python
{adapter_snippet(facts, adapter_id, interpolate)}```

{_usage_notes(interpolate)}"""
    )
