"""
From per-region class scores to detections, and from the model's image size to the requested one.

:class:`DetectionSelector` picks the detections of one image (the authors' top-k (region, class)
pairs, or each region with its best class); :func:`rescale_results` brings an image's results to
the output size, as detectron2's ``detector_postprocess`` does for its detectors.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from detectron2.structures import Instances, ROIMasks

__all__ = ["DetectionSelector", "select_detections", "rescale_results", "SCORING_MODES", "BOX_SCORE_ORDERS"]

SCORING_MODES = ("topk_pairs", "per_region")
BOX_SCORE_ORDERS = ("after_topk", "before_topk")


def select_detections(
    probs: torch.Tensor,
    box_scores: Optional[torch.Tensor],
    mode: str,
    topk: int,
    max_detections: int,
    score_thresh: float,
    box_score_order: str = "after_topk",
    valid_regions: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Turn region x class probabilities into detections.

    Args:
        probs: [N, C] class probabilities of N regions.
        box_scores: [N] scores of the boxes themselves (multiplied in), or None.
        mode: "topk_pairs" (best ``topk`` (region, class) pairs, a region may repeat) or
            "per_region" (each region with its best class).
        topk: k of "topk_pairs".
        max_detections: cap after selection (``TEST.DETECTIONS_PER_IMAGE``); <= 0 for none.
        score_thresh: minimum score.
        box_score_order: with ``box_scores`` in "topk_pairs": "after_topk" takes the top ``topk``
            pairs by class probability, then multiplies by the box score (the authors'
            evaluation); "before_topk" takes the top ``topk`` pairs of the product.
        valid_regions: [N] bool; pairs of other regions are dropped after the top-k and before
            the cap (as the authors drop detections whose clipped box is empty before LVIS keeps
            the best 300 of an image).

    Returns:
        region indices [K], class indices [K], scores [K], sorted by descending score.
    """
    if box_score_order not in BOX_SCORE_ORDERS:
        raise ValueError(f"MODEL.REGIONSPOT.SCORE.BOX_SCORE_ORDER={box_score_order!r}: use one of {BOX_SCORE_ORDERS}.")
    after_topk = mode == "topk_pairs" and box_scores is not None and box_score_order == "after_topk"
    scores = probs if box_scores is None or after_topk else probs * box_scores[:, None]
    num_classes = scores.shape[1]
    if mode == "topk_pairs":
        k = min(topk, scores.numel())
        top, flat = scores.flatten().topk(k)
        regions, classes = flat // num_classes, flat % num_classes
        if after_topk:
            top = top * box_scores[regions]
            # Stable, so pairs of equal score keep the order of their class probabilities.
            top, order = top.sort(descending=True, stable=True)
            regions, classes = regions[order], classes[order]
    elif mode == "per_region":
        top, classes = scores.max(dim=1) if scores.shape[0] else (scores.new_zeros(0), scores.new_zeros(0, dtype=torch.long))
        order = top.argsort(descending=True)
        top, classes, regions = top[order], classes[order], order
    else:
        raise ValueError(f"MODEL.REGIONSPOT.SCORE.MODE={mode!r}: use one of {SCORING_MODES}.")
    keep = top > score_thresh
    if valid_regions is not None:
        keep &= valid_regions[regions]
    regions, classes, top = regions[keep], classes[keep], top[keep]
    if max_detections > 0:
        regions, classes, top = regions[:max_detections], classes[:max_detections], top[:max_detections]
    return regions, classes, top


@dataclass
class DetectionSelector:
    """
    The detections of one image from its regions' class scores (see :func:`select_detections`).

    Attributes:
        scoring: "topk_pairs" or "per_region" (``MODEL.REGIONSPOT.SCORE.MODE``).
        topk: k of "topk_pairs" (``MODEL.REGIONSPOT.SCORE.TOPK``).
        detections_per_image: cap (``TEST.DETECTIONS_PER_IMAGE``); <= 0 for none.
        score_thresh: minimum score (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``).
        box_score_order: "after_topk" or "before_topk" (``MODEL.REGIONSPOT.SCORE.BOX_SCORE_ORDER``).
    """

    scoring: str = "topk_pairs"
    topk: int = 900
    detections_per_image: int = 300
    score_thresh: float = 0.0
    box_score_order: str = "after_topk"

    def __post_init__(self):
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.SCORE.MODE={self.scoring!r}: use one of {SCORING_MODES}.")
        if self.box_score_order not in BOX_SCORE_ORDERS:
            raise ValueError(
                f"MODEL.REGIONSPOT.SCORE.BOX_SCORE_ORDER={self.box_score_order!r}: use one of {BOX_SCORE_ORDERS}."
            )

    @classmethod
    def from_config(cls, cfg) -> "DetectionSelector":
        rs = cfg.MODEL.REGIONSPOT
        return cls(
            scoring=rs.SCORE.MODE,
            topk=rs.SCORE.TOPK,
            detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            box_score_order=rs.SCORE.BOX_SCORE_ORDER,
        )

    def __call__(
        self,
        probs: torch.Tensor,
        box_scores: Optional[torch.Tensor] = None,
        valid_regions: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, C] probabilities (and [N] box scores, [N] bool valid regions) -> regions, classes, scores."""
        return select_detections(
            probs, box_scores, self.scoring, self.topk, self.detections_per_image, self.score_thresh,
            self.box_score_order, valid_regions,
        )


def rescale_results(instances: Instances, height: int, width: int, drop_empty: bool = False) -> Instances:
    """
    Results at the requested output size: boxes scaled (x by the width ratio, y by the height
    ratio) and clipped, SAM masks brought to (height, width) as their ``SamMasks.resize`` says.

    Args:
        drop_empty: drop detections whose clipped box is empty (as ``detector_postprocess``); keep
            False for given boxes, which must keep their order and count.
    """
    h, w = instances.image_size
    out = Instances((height, width), **instances.get_fields())
    if (h, w) != (height, width):
        out.pred_boxes = out.pred_boxes.clone()
        out.pred_boxes.scale(width / w, height / h)
        out.pred_boxes.clip(out.image_size)
    if drop_empty and out.has("pred_boxes"):
        # All-zero boxes are the placeholders of point prompts without masks: kept.
        placeholder = (out.pred_boxes.tensor == 0).all(dim=1)
        out = out[out.pred_boxes.nonempty() | placeholder]
    if out.has("pred_masks") and isinstance(out.pred_masks, ROIMasks):
        out.pred_masks = out.pred_masks.to_bitmasks(out.pred_boxes, height, width).tensor
    return out
