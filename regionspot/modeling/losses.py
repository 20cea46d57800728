"""The training loss of RegionSpot's head: sigmoid focal loss of region x class logits."""
from typing import Sequence

import torch
from fvcore.nn import sigmoid_focal_loss

__all__ = ["region_focal_loss"]


def region_focal_loss(
    logits: torch.Tensor,
    labels: Sequence[torch.Tensor],
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """
    Sigmoid focal loss over the vocabulary for every GT region: summed over classes, averaged over
    an image's regions, summed over images. Images without regions add zero.

    Args:
        logits: [B, N_max, C] logits of B images' regions, padded to N_max per image.
        labels: per image [N_i] class indices into the C classes (N_i <= N_max; rows beyond N_i
            of ``logits`` are padding and ignored).
        alpha, gamma: the focal loss's (``MODEL.REGIONSPOT.LOSS.FOCAL_ALPHA`` / ``LOSS.FOCAL_GAMMA``).

    Returns:
        scalar loss (connected to ``logits`` even when no image has a region).

    Raises:
        ValueError: a label outside the C classes (the batch's dataset and the vocabulary disagree).
    """
    num_classes = logits.shape[-1]
    total = logits.sum() * 0.0
    for i, y in enumerate(labels):
        if len(y) == 0:
            continue
        if (y < 0).any() or (y >= num_classes).any():
            raise ValueError(
                f"gt_classes outside the vocabulary of {num_classes} classes; the batch's "
                "dataset and the model's vocabulary disagree."
            )
        onehot = torch.nn.functional.one_hot(y.long(), num_classes).to(logits.dtype)
        loss = sigmoid_focal_loss(logits[i, : len(y)], onehot, alpha, gamma, "none")
        total = total + loss.sum(dim=1).mean()
    return total
