"""
SAM's automatic mask generator as a detectron2 proposal generator.

``SamAutomaticProposals`` (``MODEL.PROPOSAL_GENERATOR.NAME``) runs the stock
``segment_anything.SamAutomaticMaskGenerator`` (a grid of point prompts, filtering by predicted IoU
and stability, box NMS) on each image and returns the boxes of the masks it keeps as detectron2
proposals: ``proposal_boxes`` and ``objectness_logits`` (the logit of SAM's predicted IoU), so the
RegionSpot head can multiply class probabilities by SAM's own confidence (``USE_BOX_SCORES``).
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from .frozen import keep_out_of_checkpoints
from .roi_heads import images_to_rgb_uint8
from .sam_tokens import build_sam

logger = logging.getLogger(__name__)

__all__ = ["SamAutomaticProposals", "amg_masks_to_proposals"]

# Predicted IoUs are clamped into (EPS, 1 - EPS) before the logit.
_EPS = 1e-4


def amg_masks_to_proposals(
    records: Sequence[Dict], image_size: Tuple[int, int], max_proposals: int, device=None
) -> Instances:
    """
    Turn ``SamAutomaticMaskGenerator.generate`` records into detectron2 proposals.

    Args:
        records: dicts with ``bbox`` (XYWH, pixels) and ``predicted_iou``.
        image_size: (h, w) of the image.
        max_proposals: keep at most this many, highest predicted IoU first (<= 0: all).

    Returns:
        Instances with ``proposal_boxes`` (XYXY = x, y, x + w, y + h) and ``objectness_logits``
        (logit of the predicted IoU, clamped into (1e-4, 1 - 1e-4)), sorted by score.
    """
    iou = torch.tensor([float(r["predicted_iou"]) for r in records], dtype=torch.float32)
    xywh = torch.tensor([[float(v) for v in r["bbox"]] for r in records], dtype=torch.float32).reshape(-1, 4)
    order = iou.argsort(descending=True)
    if max_proposals > 0:
        order = order[:max_proposals]
    iou, xywh = iou[order], xywh[order]
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    out = Instances(tuple(image_size))
    out.proposal_boxes = Boxes(xyxy.to(device))
    out.objectness_logits = torch.logit(iou.clamp(_EPS, 1 - _EPS)).to(device)
    return out


@PROPOSAL_GENERATOR_REGISTRY.register()
class SamAutomaticProposals(nn.Module):
    """
    Class-agnostic proposals from SAM's automatic mask generator (frozen; nothing trains).

    ``forward(images, features, gt_instances)`` follows detectron2's proposal-generator contract;
    backbone ``features`` are not used (SAM reads the pixels: ``images`` are un-normalised with
    ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` and converted from ``INPUT.FORMAT`` to RGB).

    SAM is the head's when the model calls :meth:`use_sam` (the ``RegionSpot`` meta-architecture
    does, so SAM's encoder weights are held once); otherwise the generator builds its own from
    ``MODEL.REGIONSPOT.SAM.*`` on its first call. SAM is never part of the state dict.
    """

    @configurable
    def __init__(
        self,
        *,
        sam: Optional[Sam] = None,
        sam_spec: Optional[Dict] = None,
        pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        input_format: str = "RGB",
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        max_proposals: int = 300,
    ):
        """
        Args:
            sam: a stock ``segment_anything.Sam``; or None to build one from ``sam_spec`` (keyword
                arguments of :func:`build_sam`) when first needed.
            pixel_mean, pixel_std, input_format: how ``images`` were normalised.
            points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
                box_nms_thresh: ``SamAutomaticMaskGenerator``'s arguments.
            max_proposals: proposals kept per image, highest predicted IoU first (<= 0: all).
        """
        super().__init__()
        if sam is None and sam_spec is None:
            raise ValueError("SamAutomaticProposals needs a SAM or the arguments of build_sam.")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={input_format!r}: SamAutomaticProposals reads RGB or BGR images.")
        self.sam_spec = dict(sam_spec or {})
        self.sam = None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.input_format = input_format
        self.amg_kwargs = dict(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            output_mode="binary_mask",
        )
        self.max_proposals = max_proposals
        self._generator: Optional[SamAutomaticMaskGenerator] = None
        if sam is not None:
            self.use_sam(sam)
        # SAM comes from its own file: never saved with the model, never "missing" when loading.
        keep_out_of_checkpoints(self, "sam")

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        rs = cfg.MODEL.REGIONSPOT
        amg = rs.AMG
        return {
            "sam_spec": {
                "sam_type": rs.SAM.TYPE,
                "weights": rs.SAM.WEIGHTS,
                "random_init": rs.RANDOM_INIT_FROZEN,
                "seed": rs.RANDOM_INIT_SEED,  # the seed of the head's SAM: the same weights
            },
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "points_per_side": amg.POINTS_PER_SIDE,
            "points_per_batch": amg.POINTS_PER_BATCH,
            "pred_iou_thresh": amg.PRED_IOU_THRESH,
            "stability_score_thresh": amg.STABILITY_SCORE_THRESH,
            "box_nms_thresh": amg.BOX_NMS_THRESH,
            "max_proposals": amg.MAX_PROPOSALS,
        }

    def use_sam(self, sam: Sam) -> "SamAutomaticProposals":
        """Run on ``sam`` (e.g. the RegionSpot head's frozen SAM) instead of building one."""
        if not isinstance(sam, Sam):
            raise TypeError(f"use_sam() takes a segment_anything Sam, not {type(sam).__name__}.")
        for p in sam.parameters():
            p.requires_grad_(False)
        self.sam = sam.eval()
        self._generator = None
        return self

    def train(self, mode: bool = True):
        # Nothing trains; SAM keeps eval-mode behaviour.
        super().train(mode)
        if self.sam is not None:
            self.sam.eval()
        return self

    def _mask_generator(self, device: torch.device) -> SamAutomaticMaskGenerator:
        if self.sam is None:
            logger.info(f"SamAutomaticProposals: building its own SAM ({self.sam_spec.get('sam_type')}).")
            self.use_sam(build_sam(**self.sam_spec).to(device))
        if self._generator is None:
            self._generator = SamAutomaticMaskGenerator(self.sam, **self.amg_kwargs)
        return self._generator

    @torch.no_grad()
    def propose(self, image: np.ndarray) -> Instances:
        """
        Args:
            image: [H, W, 3] uint8 RGB.

        Returns:
            Instances of size (H, W) with ``proposal_boxes`` and ``objectness_logits``.
        """
        device = self.pixel_mean.device
        generator = self._mask_generator(device)
        records = generator.generate(np.ascontiguousarray(image))
        return amg_masks_to_proposals(records, image.shape[:2], self.max_proposals, device)

    def forward(
        self,
        images: ImageList,
        features: Optional[Dict[str, torch.Tensor]] = None,
        gt_instances: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """
        Args:
            images: the batch's pixels (normalised with ``pixel_mean``/``pixel_std``).
            features, gt_instances: unused.

        Returns:
            per image Instances with ``proposal_boxes`` (XYXY in ``images`` pixels) and
            ``objectness_logits``; and an empty loss dict (nothing trains).
        """
        del features, gt_instances
        rgbs = images_to_rgb_uint8(images, self.pixel_mean, self.pixel_std, self.input_format)
        return [self.propose(rgb) for rgb in rgbs], {}
