"""Trainable heads of the IRRA losses: the identity classifier (ID) and the cross-modal MLM head.

The heads own parameters, so they live in the model; the losses in `model.objectives.irra` receive their outputs.
"""

from __future__ import annotations

from torch import Tensor, nn


class IdentityClassifier(nn.Module):
    """Linear person-identity classifier shared by both modalities (IRRA's ID loss).

    Weights start at N(0, 0.001) and the bias at 0, as in IRRA, so the initial logits are almost uniform.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Tensor) -> Tensor:
        """Identity logits.

        Shapes:
            feats: (B, D) -> (B, num_classes)
        """
        return self.fc(feats)


class CrossModalMLMHead(nn.Module):
    """IRRA's cross-modal MLM head: predicts masked caption tokens from text tokens that attended to the image.

    Text hidden states (queries) attend to image hidden states (keys and values) through one cross-attention
    layer with pre-LayerNorms on both inputs; its output (no residual, as in IRRA) goes through `depth` pre-norm
    transformer layers and a final LayerNorm, then Linear -> GELU -> LayerNorm -> Linear(vocab). Initialisation
    follows CLIP: attention inputs N(0, D^-1/2), output projections N(0, D^-1/2 (2 depth)^-1/2), first MLP layers
    N(0, (2D)^-1/2).

    Args:
        embed_dim: Width D of both hidden-state sequences.
        vocab_size: Size of the tokenizer vocabulary.
        num_heads: Attention heads; must divide `embed_dim`.
        depth: Number of transformer layers after the cross-attention.

    Raises:
        ValueError: If `num_heads` does not divide `embed_dim` or `depth` < 1.
    """

    def __init__(self, embed_dim: int, vocab_size: int, *, num_heads: int = 12, depth: int = 4) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"CrossModalMLMHead: num_heads={num_heads} must be a positive divisor of "
                f"embed_dim={embed_dim}; set the MLM head's num_heads accordingly (12 for 768-d)."
            )
        if depth < 1:
            raise ValueError(f"CrossModalMLMHead: depth={depth} must be at least 1.")
        self.ln_pre_text = nn.LayerNorm(embed_dim)
        self.ln_pre_image = nn.LayerNorm(embed_dim)
        self.cross_attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=4 * embed_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only apply to post-norm layers; disabling them avoids a warning per construction.
        self.cross_modal_transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.ln_post = nn.LayerNorm(embed_dim)
        self.mlm_head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, vocab_size),
        )
        self._init_weights(embed_dim, depth)

    def _init_weights(self, width: int, depth: int) -> None:
        attn_std = width**-0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        attentions = [self.cross_attn, *(block.self_attn for block in self.cross_modal_transformer.layers)]
        for attention in attentions:
            nn.init.normal_(attention.in_proj_weight, std=attn_std)
            nn.init.normal_(attention.out_proj.weight, std=proj_std)
        for block in self.cross_modal_transformer.layers:
            nn.init.normal_(block.linear1.weight, std=fc_std)
            nn.init.normal_(block.linear2.weight, std=proj_std)
        nn.init.normal_(self.mlm_head[0].weight, std=fc_std)
        nn.init.normal_(self.mlm_head[3].weight, std=proj_std)

    def forward(self, text_hidden: Tensor, image_hidden: Tensor) -> Tensor:
        """Vocabulary logits for every text position.

        Shapes:
            text_hidden: (B, L, D), image_hidden: (B, N, D) -> (B, L, vocab_size)
        """
        image = self.ln_pre_image(image_hidden)
        fused = self.cross_attn(self.ln_pre_text(text_hidden), image, image, need_weights=False)[0]
        return self.mlm_head(self.ln_post(self.cross_modal_transformer(fused)))
