"""The TBPS module: a dual encoder (SigLIP, or CLIP) plus the heads some losses need.

`encode_image` / `encode_text` give L2-normalised pooled embeddings (evaluation and search use these). `forward`
encodes a training batch into `TrainFeatures`; which losses are then computed is the objective's business
(`model/objective.py`), so this module holds no loss logic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from model.features import TrainFeatures
from model.heads import CrossModalMLMHead, IdentityClassifier

#: The temperature exp(logit_scale) is capped at this value (CLIP's and SigLIP's cap).
MAX_TEMPERATURE = 100.0


#: How each text tower turns the (B, L) padding mask into its attention mask, by `text_config.model_type`. Called
#: here with transformers' skip switched off: to drop a mask without padding, transformers reads it back from the GPU
#: (a host synchronisation in every forward); a prepared 4-D mask it takes as it is. An all-ones mask then costs one
#: masked attention, which SigLIP's max-length padding needs anyway.
TEXT_MASKS = {
    "siglip_text_model": lambda config, embeds, mask: create_bidirectional_mask(
        config, embeds, mask, allow_is_bidirectional_skip=False
    ),
    "clip_text_model": lambda config, embeds, mask: create_causal_mask(
        config, embeds, mask, None, allow_is_causal_skip=False
    ),
}


def pooled(output) -> Tensor:
    """Transformers 5 returns an output object from get_*_features, 4.x a tensor."""
    return getattr(output, "pooler_output", output)


@dataclass(frozen=True)
class HeadSpec:
    """Optional heads: SimCLR projection, identity classifier (`num_classes`), MLM cross-former (`mlm_depth`)."""

    simclr: bool = False
    num_classes: int | None = None
    mlm_depth: int | None = None


class TBPS(nn.Module):
    """Dual-encoder person search model around a Hugging Face `SiglipModel` or `CLIPModel`."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        heads: HeadSpec = HeadSpec(),
        *,
        freeze_vision: bool = False,
        freeze_text: bool = False,
        freeze_token_embedding: bool = False,
        interpolate_pos_encoding: bool = False,
    ):
        """Args:
        backbone: A dual encoder loaded by `model.backbone.load_backbone`.
        heads: Which optional heads to build.
        freeze_vision: Keep the vision tower's weights fixed.
        freeze_text: Keep the text tower's weights fixed.
        freeze_token_embedding: Keep the text token embedding fixed (no gradient, no optimizer state).
        interpolate_pos_encoding: Interpolate vision positions on every call (CLIP at a non-native size).
        """
        super().__init__()
        self.backbone = backbone
        self.interpolate_pos_encoding = interpolate_pos_encoding
        text_width = int(backbone.config.text_config.hidden_size)
        self.embed_dim = int(getattr(backbone.config, "projection_dim", None) or text_width)
        for tower, frozen in ((backbone.vision_model, freeze_vision), (backbone.text_model, freeze_text)):
            if frozen:  # never re-enable: LoRA may already have frozen the base weights
                tower.requires_grad_(False)
        if freeze_token_embedding:
            backbone.text_model.embeddings.token_embedding.requires_grad_(False)
        dim = self.embed_dim
        self.simclr_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) if heads.simclr else None
        self.classifier = IdentityClassifier(dim, heads.num_classes) if heads.num_classes else None
        self.mlm_head = None
        if heads.mlm_depth:
            if int(backbone.config.vision_config.hidden_size) != text_width:
                raise ValueError("The MLM head needs vision and text towers of the same width.")
            num_heads = int(backbone.config.text_config.num_attention_heads)
            vocab = int(backbone.config.text_config.vocab_size)
            self.mlm_head = CrossModalMLMHead(text_width, vocab, num_heads=num_heads, depth=heads.mlm_depth)
        # from_pretrained returns the backbone in eval mode and Lightning keeps submodule modes as it finds them:
        # without this the towers would train with dropout off (and warn "modules in eval mode").
        self.train()

    @property
    def logit_scale(self) -> Tensor:
        """Temperature t = min(exp(t'), 100) in value, with the gradient of exp(t') (straight-through cap).

        Pre-trained checkpoints start at or above the cap (CLIP at t' = log 100, SigLIP near 4.72): clamping t'
        itself would give its gradient 0 there and the temperature would never be learned.
        """
        temperature = self.backbone.logit_scale.exp().squeeze()
        return temperature - (temperature - temperature.clamp(max=MAX_TEMPERATURE)).detach()

    @property
    def logit_bias(self) -> Tensor:
        """SigLIP's learnable bias; CLIP has none (0)."""
        bias = getattr(self.backbone, "logit_bias", None)
        return bias.squeeze() if bias is not None else self.backbone.logit_scale.new_zeros(())

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """Pooled, unnormalised vision embeddings (B, D)."""
        return pooled(self._vision(pixel_values))

    def _vision(self, pixel_values: Tensor):
        return self.backbone.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding
        )

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled, unnormalised text embeddings (B, D)."""
        mask = self.text_attention_mask(input_ids, attention_mask)
        return pooled(self.backbone.get_text_features(input_ids=input_ids, attention_mask=mask))

    def text_attention_mask(self, input_ids: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        """The text tower's attention mask for a (B, L) padding mask, built as the tower would (`TEXT_MASKS`)."""
        text_config = self.backbone.config.text_config
        build = TEXT_MASKS.get(text_config.model_type)
        if padding_mask is None or build is None:
            return padding_mask
        dtype = self.backbone.text_model.embeddings.token_embedding.weight.dtype
        # The builders read only the shape, dtype and device of the embeddings they are given.
        embeds_like = input_ids.new_empty((*input_ids.shape, 0), dtype=dtype)
        return build(text_config, embeds_like, padding_mask)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised image embeddings (B, D)."""
        return F.normalize(self.image_embeddings(pixel_values), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """L2-normalised text embeddings (B, D)."""
        return F.normalize(self.text_embeddings(input_ids, attention_mask), dim=-1)

    def keep_logit_parameters(self, *, scale: bool, bias: bool) -> list[str]:
        """Freeze `logit_scale` / `logit_bias` when no loss reads them; returns the names frozen.

        A trainable parameter that receives no gradient stops DDP ("Expected to have finished reduction") unless it
        searches for unused parameters on every step, and would drift under weight decay.
        """
        frozen = []
        for name, used in (("logit_scale", scale), ("logit_bias", bias)):
            parameter = getattr(self.backbone, name, None)
            if parameter is not None and parameter.requires_grad and not used:
                parameter.requires_grad_(False)
                frozen.append(name)
        return frozen

    def forward(
        self,
        batch: Mapping[str, Tensor],
        *,
        aug_view: bool = False,
        ss_views: bool = False,
        raw_features: bool = False,
    ) -> TrainFeatures:
        """Encode a training batch.

        Args:
            batch: `images`, `caption_input_ids`, `pids`, optionally `caption_attention_mask`, `aug_images`,
                `ss_images1`, `ss_images2`, and with the MLM head `mlm_input_ids`, `mlm_labels` (all (B, ...)).
            aug_view: Also encode `aug_images` (multi-view supervision).
            ss_views: Also encode the two SimCLR views through the SimCLR head.
            raw_features: Also return the embeddings before L2 normalisation (for CMPM).
        """
        pixel_values = batch["images"]
        batch_size = pixel_values.shape[0]
        extra_views = [batch["aug_images"]] if aug_view else []
        if ss_views:
            if self.simclr_mlp is None:
                raise RuntimeError("SimCLR views requested but the model was built without the SimCLR head.")
            extra_views += [batch["ss_images1"], batch["ss_images2"]]
        # One vision pass over every view: fewer kernel launches for the same activations.
        vision = self._vision(torch.cat([pixel_values, *extra_views]) if extra_views else pixel_values)
        views = list(pooled(vision).split(batch_size))
        image = views.pop(0)
        aug = views.pop(0) if aug_view else None
        ss_a, ss_b = (self.simclr_mlp(views[0]), self.simclr_mlp(views[1])) if ss_views else (None, None)
        text = self.text_embeddings(batch["caption_input_ids"], batch.get("caption_attention_mask"))

        mlm_logits = None
        if self.mlm_head is not None:
            mlm_ids = batch["mlm_input_ids"]
            masked = self.backbone.text_model(
                input_ids=mlm_ids, attention_mask=self.text_attention_mask(mlm_ids, batch.get("mlm_attention_mask"))
            )
            mlm_logits = self.mlm_head(masked.last_hidden_state, vision.last_hidden_state[:batch_size])
        return TrainFeatures(
            image_feats=F.normalize(image, dim=-1),
            text_feats=F.normalize(text, dim=-1),
            pids=batch["pids"],
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            aug_image_feats=F.normalize(aug, dim=-1) if aug is not None else None,
            ss_feats_a=ss_a,
            ss_feats_b=ss_b,
            # IRRA classifies the unnormalised embeddings.
            id_logits_image=self.classifier(image) if self.classifier is not None else None,
            id_logits_text=self.classifier(text) if self.classifier is not None else None,
            mlm_logits=mlm_logits,
            mlm_labels=batch.get("mlm_labels") if self.mlm_head is not None else None,
            raw_image_feats=image if raw_features else None,
            raw_text_feats=text if raw_features else None,
        )
