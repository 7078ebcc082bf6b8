"""The TBPS module: a SigLIP dual encoder plus the heads some losses need.

`encode_image` / `encode_text` give L2-normalised pooled embeddings (evaluation and search use these). `forward`
encodes a training batch into `TrainFeatures`; which losses are then computed is the objective's business
(`model/strategies.py`), so this module holds no loss logic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from model.strategies import TrainFeatures

#: exp(logit_scale) is capped here (the seed's clamp value); clamping the log keeps the gradient honest.
MAX_LOGIT_SCALE = math.log(100.0)


def pooled(output) -> Tensor:
    """transformers 5 returns an output object from get_*_features, 4.x a tensor."""
    return getattr(output, "pooler_output", output)


class TBPS(nn.Module):
    """Dual-encoder person search model around a Hugging Face `SiglipModel`."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        *,
        simclr_head: bool = False,
        freeze_vision: bool = False,
        freeze_text: bool = False,
    ):
        """
        Args:
            backbone: A `SiglipModel` (loaded by `model.backbone.load_backbone`).
            simclr_head: Add the 2-layer MLP that SimCLR self-supervision projects image features with.
            freeze_vision: Keep the vision tower's weights fixed.
            freeze_text: Keep the text tower's weights fixed.
        """
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.config.text_config.hidden_size)
        for tower, frozen in ((backbone.vision_model, freeze_vision), (backbone.text_model, freeze_text)):
            tower.requires_grad_(not frozen)
        self.simclr_mlp = (
            nn.Sequential(
                nn.Linear(self.embed_dim, self.embed_dim), nn.ReLU(), nn.Linear(self.embed_dim, self.embed_dim)
            )
            if simclr_head
            else None
        )

    @property
    def logit_scale(self) -> Tensor:
        """Temperature t = exp(t'), with t' clamped to log(100)."""
        return self.backbone.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().squeeze()

    @property
    def logit_bias(self) -> Tensor:
        return self.backbone.logit_bias.squeeze()

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """Pooled, unnormalised vision embeddings (B, D)."""
        return pooled(self.backbone.get_image_features(pixel_values=pixel_values))

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled, unnormalised text embeddings (B, D) (last position through the text head)."""
        return pooled(self.backbone.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised image embeddings (B, D)."""
        return F.normalize(self.image_embeddings(pixel_values), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """L2-normalised text embeddings (B, D)."""
        return F.normalize(self.text_embeddings(input_ids, attention_mask), dim=-1)

    def forward(self, batch: Mapping[str, Tensor], *, aug_view: bool = False, ss_views: bool = False) -> TrainFeatures:
        """Encode a training batch.

        Args:
            batch: `images`, `caption_input_ids`, `pids`, optionally `caption_attention_mask`, `aug_images`,
                `ss_images1`, `ss_images2` (all (B, ...)).
            aug_view: Also encode `aug_images` (multi-view supervision).
            ss_views: Also encode the two SimCLR views through the SimCLR head.
        """
        pixel_values = batch["images"]
        batch_size = pixel_values.shape[0]
        extra_views = [batch["aug_images"]] if aug_view else []
        if ss_views:
            if self.simclr_mlp is None:
                raise RuntimeError("SimCLR views requested but the model was built without simclr_head=True.")
            extra_views += [batch["ss_images1"], batch["ss_images2"]]
        # One vision pass over every view: fewer kernel launches, and the same normalisation statistics.
        vision = self.image_embeddings(torch.cat([pixel_values, *extra_views]) if extra_views else pixel_values)
        views = list(vision.split(batch_size))
        image = views.pop(0)
        aug = views.pop(0) if aug_view else None
        ss_a, ss_b = (self.simclr_mlp(views[0]), self.simclr_mlp(views[1])) if ss_views else (None, None)
        text = self.text_embeddings(batch["caption_input_ids"], batch.get("caption_attention_mask"))
        return TrainFeatures(
            image_feats=F.normalize(image, dim=-1),
            text_feats=F.normalize(text, dim=-1),
            pids=batch["pids"],
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            aug_image_feats=F.normalize(aug, dim=-1) if aug is not None else None,
            ss_feats_a=ss_a,
            ss_feats_b=ss_b,
        )
