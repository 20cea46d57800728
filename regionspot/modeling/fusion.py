"""The trainable part of RegionSpot: region tokens attend to CLIP's feature map."""
from typing import Optional

import torch
from torch import nn

__all__ = ["RegionSpotFusion"]


class RegionSpotFusion(nn.Module):
    """
    Fuse SAM region tokens with CLIP's dense features into region embeddings in CLIP's text space.

    ``to_clip`` lifts each token to CLIP's visual width, a post-norm transformer decoder (self-
    attention among the regions of an image, cross-attention into CLIP's tokens, FFN; no
    positional embeddings) refines them, and ``projector`` maps them into the text space. Parameter
    names match the released checkpoints after their ``model.`` prefix.

    Args:
        token_dim: width of SAM's region tokens (256).
        clip_dim: D_v, width of CLIP's visual tokens.
        embed_dim: D_t, width of CLIP's text embeddings.
        num_layers, num_heads, dim_feedforward, dropout: decoder sizes.
    """

    def __init__(
        self,
        token_dim: int,
        clip_dim: int,
        embed_dim: int,
        num_layers: int = 3,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.to_clip = nn.Linear(token_dim, clip_dim)
        layer = nn.TransformerDecoderLayer(
            clip_dim, num_heads, dim_feedforward=dim_feedforward, dropout=dropout,
            activation="relu", batch_first=True, norm_first=False,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(clip_dim))
        self.projector = nn.Linear(clip_dim, embed_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        clip_features: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens: [B, N, token_dim] region tokens, B images with N regions each.
            clip_features: [B, L, D_v] CLIP token sequences of the same images.
            padding_mask: [B, N] bool, True where a region is padding (ignored by the others).

        Returns:
            [B, N, D_t] region embeddings (not normalised).
        """
        x = self.to_clip(tokens)
        x = self.decoder(x, clip_features.to(x.dtype), tgt_key_padding_mask=padding_mask)
        return self.projector(x)
