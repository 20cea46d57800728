"""
SAM's automatic mask generator as a detectron2 proposal generator.

``SamAutomaticProposals`` (``MODEL.PROPOSAL_GENERATOR.NAME``) runs the stock
``segment_anything.SamAutomaticMaskGenerator`` (a grid of point prompts, filtering by predicted IoU
and stability, box NMS) on each image and returns the boxes of the masks it keeps as detectron2
proposals: ``proposal_boxes`` and ``objectness_logits`` (the logit of SAM's predicted IoU), so the
RegionSpot head can multiply class probabilities by SAM's own confidence (``SCORE.USE_BOX_SCORES``).

SAM's image encoder is by far the costliest step (seconds per image for ViT-B on a CPU), and the
RegionSpot head needs the same image embedding to decode its region prompts. The generator
therefore encodes each image with the head's SAM adapter (:meth:`SamRegionTokens.encode_images`, the
very call the head makes) and :meth:`SamAutomaticProposals.propose_with_image_states` returns those
image states (:class:`SamImageState`) with the proposals, for the head to reuse: one encoding per image.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from ..data.proposals import score_logits
from .frozen import keep_out_of_checkpoints
from .pixels import PIXEL_FORMATS, image_hw, rgb_images
from .sam_tokens import SamImageState, SamRegionTokens, build_sam

logger = logging.getLogger(__name__)

__all__ = ["SamAutomaticProposals", "amg_masks_to_proposals"]



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
        (logit of the predicted IoU, clipped as every box score: ``data.proposals.score_logits``),
        sorted by score.
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
    out.objectness_logits = score_logits(iou).to(device)
    return out


class _GivenStatePredictor(SamPredictor):
    """
    A ``SamPredictor`` that takes the image's embedding already computed instead of encoding it.

    ``SamAutomaticMaskGenerator`` calls ``predictor.set_image(crop)`` for each of its crops; set
    :attr:`given_state` before ``generate`` and the crop that is the whole image (the only one with
    the default ``crop_n_layers=0``) gets that state, whose embedding SAM's encoder made from the same
    ``ResizeLongestSide`` + normalisation + padding as ``set_image`` (``SamRegionTokens.encode_images``).
    Any other crop, or no state, is encoded as the stock predictor does.
    """

    def __init__(self, sam_model: Sam):
        super().__init__(sam_model)
        self.given_state: Optional[SamImageState] = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        # Used once: a later crop (or a later image) must never decode on this embedding.
        state, self.given_state = self.given_state, None
        whole_image = state is not None and tuple(image.shape[:2]) == tuple(state.original_size)
        if not whole_image or image_format != self.model.image_format:
            super().set_image(image, image_format)
            return
        self.reset_image()
        self.original_size = tuple(state.original_size)
        self.input_size = tuple(state.input_size)
        self.features = state.embedding
        self.is_image_set = True


@PROPOSAL_GENERATOR_REGISTRY.register()
class SamAutomaticProposals(nn.Module):
    """
    Class-agnostic proposals from SAM's automatic mask generator (frozen; nothing trains).

    ``forward(images, features, gt_instances)`` follows detectron2's proposal-generator contract;
    backbone ``features`` are not used (SAM reads the pixels: ``images`` are un-normalised with
    ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` and converted from ``INPUT.FORMAT`` to RGB).

    SAM is the head's when the model calls :meth:`use_sam` with the head's ``SamRegionTokens`` (the
    ``RegionSpot`` meta-architecture does, so SAM's weights are held once and each image is encoded
    once: see :meth:`propose_with_image_states`); otherwise the generator builds its own from
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
            sam: a stock ``segment_anything.Sam`` or a ``SamRegionTokens`` (see :meth:`use_sam`); or
                None to build one from ``sam_spec`` (keyword arguments of :func:`build_sam`) when
                first needed.
            pixel_mean, pixel_std, input_format: how ``images`` were normalised.
            points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
                box_nms_thresh: ``SamAutomaticMaskGenerator``'s arguments.
            max_proposals: proposals kept per image, highest predicted IoU first (<= 0: all).
        """
        super().__init__()
        if sam is None and sam_spec is None:
            raise ValueError("SamAutomaticProposals needs a SAM or the arguments of build_sam.")
        if input_format not in PIXEL_FORMATS:
            raise ValueError(f"INPUT.FORMAT={input_format!r}: SamAutomaticProposals reads RGB or BGR images.")
        self.sam_spec = dict(sam_spec or {})
        self.sam = None
        # The SamRegionTokens whose encode_images makes the image states (the head's, in RegionSpot).
        self.sam_encoder: Optional[SamRegionTokens] = None
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
        keep_out_of_checkpoints(self, "sam", "sam_encoder")

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        rs = cfg.MODEL.REGIONSPOT
        amg = rs.AMG
        return {
            "sam_spec": {
                "sam_type": rs.SAM.TYPE,
                "weights": rs.SAM.WEIGHTS,
                "random_init": rs.FROZEN.RANDOM_INIT,
                "seed": rs.FROZEN.SEED,  # the seed of the head's SAM: the same weights
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

    def use_sam(self, sam: Union[Sam, SamRegionTokens]) -> "SamAutomaticProposals":
        """
        Run on ``sam`` instead of building one.

        Args:
            sam: the RegionSpot head's ``SamRegionTokens`` (``roi_heads.sam``): images are then
                encoded by its ``encode_images``, exactly as the head encodes them (same resize,
                batching and ``FROZEN.PRECISION``), so the head can use the states of
                :meth:`propose_with_image_states`; or a stock ``segment_anything.Sam``, which is
                wrapped with the stock forwards (``SamRegionTokens(sam, fast=False)``).
        """
        if isinstance(sam, SamRegionTokens):
            encoder = sam
        elif isinstance(sam, Sam):
            encoder = SamRegionTokens(sam, fast=False)
        else:
            raise TypeError(f"use_sam() takes a segment_anything Sam or a SamRegionTokens, not {type(sam).__name__}.")
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.sam_encoder = encoder
        self.sam = encoder.sam.eval()
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
            # The stock predictor would run the image encoder again on every image.
            self._generator.predictor = _GivenStatePredictor(self.sam)
        return self._generator

    @torch.no_grad()
    def propose(self, image, state: Optional[SamImageState] = None) -> Instances:
        """
        Args:
            image: [3, H, W] uint8 RGB tensor or [H, W, 3] uint8 RGB numpy (the stock mask generator
                reads numpy: a tensor is copied to the CPU for it).
            state: SAM's state of this very image (``sam_encoder.encode_images`` of it), so that the
                mask generator decodes its point grid on it; None: the mask generator encodes the
                image itself.

        Returns:
            Instances of size (H, W) with ``proposal_boxes`` and ``objectness_logits``.

        Raises:
            ValueError: ``state`` was made from an image of another size.
        """
        size = image_hw(image)
        if state is not None and tuple(state.original_size) != size:
            raise ValueError(
                f"propose(): the SAM state is of a {tuple(state.original_size)} image, the image is "
                f"{size}; give the state encoded from this image."
            )
        device = self.pixel_mean.device
        generator = self._mask_generator(device)
        generator.predictor.given_state = state
        try:
            if isinstance(image, torch.Tensor):
                image = image.permute(1, 2, 0).cpu().numpy()
            records = generator.generate(np.ascontiguousarray(image))
        finally:
            generator.predictor.given_state = None
        return amg_masks_to_proposals(records, size, self.max_proposals, device)

    @torch.no_grad()
    def propose_with_image_states(self, images: ImageList) -> Tuple[List[Instances], List[SamImageState]]:
        """
        Proposals of each image, and the SAM image state they were decoded from.

        SAM's image encoder runs once for the batch, through ``sam_encoder.encode_images`` (with the
        ``RegionSpot`` meta-architecture, the head's own call on the same un-normalised pixels), so
        a head sharing this SAM can decode its region prompts on the returned states instead of
        encoding the images again.

        Args:
            images: the batch's pixels: uint8 RGB, or a detector's float batch normalised with
                ``pixel_mean``/``pixel_std`` (see :func:`regionspot.modeling.pixels.rgb_images`).

        Returns:
            per image, Instances as :meth:`propose`; and per image, its :class:`SamImageState`.
        """
        rgbs = rgb_images(images, self.pixel_mean, self.pixel_std, self.input_format)
        if not rgbs:
            return [], []
        self._mask_generator(self.pixel_mean.device)  # builds SAM (and its encoder) when not given one
        states = self.sam_encoder.encode_images(rgbs)
        return [self.propose(rgb, state) for rgb, state in zip(rgbs, states)], states

    def forward(
        self,
        images: ImageList,
        features: Optional[Dict[str, torch.Tensor]] = None,
        gt_instances: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """
        Args:
            images: the batch's pixels: uint8 RGB, or a detector's float batch normalised with
                ``pixel_mean``/``pixel_std`` (see :func:`regionspot.modeling.pixels.rgb_images`).
            features, gt_instances: unused.

        Returns:
            per image Instances with ``proposal_boxes`` (XYXY in ``images`` pixels) and
            ``objectness_logits``; and an empty loss dict (nothing trains).
        """
        del features, gt_instances
        proposals, _ = self.propose_with_image_states(images)
        return proposals, {}
