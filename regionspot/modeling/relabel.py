"""
Re-label a trained detector's boxes with RegionSpot.

``RegionSpotRelabel`` (``MODEL.META_ARCHITECTURE``) holds a frozen stock detector, built from its own
config (``MODEL.REGIONSPOT.DETECTOR.CONFIG``) with its own weights (``DETECTOR.WEIGHTS``), and a
``RegionSpotROIHeads``. The detector's final boxes (and scores) become the prompts; RegionSpot
gives the open-vocabulary classes and SAM masks.

:func:`load_head_weights` (defined in :mod:`regionspot.modeling.weights`, re-exported here) loads a
RegionSpot checkpoint into the head of any model (e.g. a ``GeneralizedRCNN`` whose ``MODEL.WEIGHTS``
are the detector's).
"""
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from detectron2.config import configurable, get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances

from ..data.proposals import score_logits
from .frozen import keep_out_of_checkpoints
from .meta_arch import batch_vocabulary, check_device
from .pixels import PIXEL_FORMATS, rgb_batch
from .postprocessing import rescale_results
from .weights import accept_released_checkpoints, load_detector_weights, load_head_weights

logger = logging.getLogger(__name__)

__all__ = ["RegionSpotRelabel", "build_detector", "load_detector_config", "load_head_weights"]

MODEL_ZOO_PREFIX = "model_zoo:"


# ---------------------------------------------------------------------------------------------
# The detector
def load_detector_config(config: str, weights: str = "", opts=(), device: str = "cpu"):
    """
    The stock detectron2 config of the detector: ``config`` a YAML path or
    ``"model_zoo:<name>"`` (a config shipped with detectron2), then ``opts``; ``MODEL.WEIGHTS`` and
    ``MODEL.DEVICE`` set to ``weights`` and ``device``.
    """
    if not config:
        raise ValueError(
            "MODEL.REGIONSPOT.DETECTOR.CONFIG is empty: give the detector's YAML config, e.g. "
            "model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml."
        )
    if config.startswith(MODEL_ZOO_PREFIX):
        from detectron2 import model_zoo

        name = config[len(MODEL_ZOO_PREFIX):]
        try:
            path = model_zoo.get_config_file(name)
        except RuntimeError as e:
            raise FileNotFoundError(f"MODEL.REGIONSPOT.DETECTOR.CONFIG={config!r}: {e}") from e
    else:
        path = config
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Detector config not found: {path!r} (MODEL.REGIONSPOT.DETECTOR.CONFIG); give a YAML path "
                "or model_zoo:<name of a detectron2 model-zoo config>."
            )
    det_cfg = get_cfg()
    det_cfg.merge_from_file(path)
    det_cfg.merge_from_list(list(opts))
    det_cfg.MODEL.WEIGHTS = weights
    det_cfg.MODEL.DEVICE = device
    det_cfg.freeze()
    return det_cfg


def build_detector(det_cfg) -> nn.Module:
    """Build the detector of ``det_cfg``, load ``MODEL.WEIGHTS`` (empty: random, with a warning), freeze it."""
    detector = build_model(det_cfg)
    if det_cfg.MODEL.WEIGHTS:
        load_detector_weights(detector, det_cfg.MODEL.WEIGHTS, "MODEL.REGIONSPOT.DETECTOR.WEIGHTS")
    else:
        logger.warning(
            "MODEL.REGIONSPOT.DETECTOR.WEIGHTS is empty: the detector has RANDOM weights and its boxes "
            "mean nothing (fine for tests only)."
        )
    for p in detector.parameters():
        p.requires_grad_(False)
    return detector.eval()


# ---------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class RegionSpotRelabel(nn.Module):
    """
    A frozen detector proposes boxes, RegionSpot names them.

    Per image: the input (``image`` in ``INPUT.FORMAT``, any size) is converted to the detector's
    ``INPUT.FORMAT`` and resized with its ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``; the
    detector's own forward returns its final ``pred_boxes``/``scores`` (or ``proposal_boxes``/
    ``objectness_logits`` for a proposal network) at the input's size. Those boxes are the prompts of
    the ``RegionSpotROIHeads`` (``roi_heads``), which reads the input image itself.

    Scoring follows ``MODEL.REGIONSPOT.SCORE.MODE``:

    * ``topk_pairs``: the head's protocol (top-k (box, class) pairs, class probability x detector
      score when ``SCORE.USE_BOX_SCORES``, ``TEST.DETECTIONS_PER_IMAGE``);
    * ``per_region``: one result per detector box, in the detector's order, with its best class
      (score = class probability, x detector score when ``SCORE.USE_BOX_SCORES``).

    The detector is frozen (``requires_grad`` off, always in eval mode) and not part of the state
    dict: its weights always come from ``DETECTOR.WEIGHTS``; ``MODEL.WEIGHTS`` is the RegionSpot
    checkpoint (ours or the released layout). Training (GT boxes as prompts, as the ``RegionSpot``
    meta-architecture) trains only the fusion module.
    """

    @configurable
    def __init__(
        self,
        *,
        detector: nn.Module,
        roi_heads: nn.Module,
        input_format: str = "RGB",
        detector_input_format: str = "BGR",
        detector_min_size: int = 800,
        detector_max_size: int = 1333,
        per_region: bool = False,
        use_box_scores: bool = True,
    ):
        """
        Args:
            detector: a detectron2 model whose eval forward takes ``[{"image", "height", "width"}]``
                and returns ``[{"instances": ...}]`` or ``[{"proposals": ...}]``.
            roi_heads: the RegionSpot head.
            input_format: channel order of the inputs (``INPUT.FORMAT``); the head gets their uint8
                pixels as RGB on the model's device (:func:`~.pixels.rgb_batch`), never normalised.
            detector_input_format, detector_min_size, detector_max_size: what the detector reads
                (its config's ``INPUT.FORMAT``, ``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``).
            per_region: one result per detector box, in order (else the head's top-k scoring).
            use_box_scores: multiply by the detector's scores.
        """
        super().__init__()
        for fmt, key in ((input_format, "INPUT.FORMAT"), (detector_input_format, "the detector's INPUT.FORMAT")):
            if fmt not in PIXEL_FORMATS:
                raise ValueError(f"{key}={fmt!r}: RegionSpotRelabel handles RGB and BGR images.")
        self.detector = detector
        for p in self.detector.parameters():
            p.requires_grad_(False)
        self.detector.eval()
        self.roi_heads = roi_heads
        self.input_format = input_format
        self.detector_input_format = detector_input_format
        self.detector_resize = T.ResizeShortestEdge([detector_min_size, detector_min_size], detector_max_size)
        self.per_region = per_region
        self.use_box_scores = use_box_scores
        # Where the model lives (an empty buffer moves with it).
        self.register_buffer("_device_anchor", torch.zeros(0), False)
        accept_released_checkpoints(self)
        # The detector comes from DETECTOR.WEIGHTS: never saved with the model, never "missing".
        keep_out_of_checkpoints(self, "detector")

    @classmethod
    def from_config(cls, cfg):
        check_device(cfg.MODEL.DEVICE)
        rs = cfg.MODEL.REGIONSPOT
        det_cfg = load_detector_config(rs.DETECTOR.CONFIG, rs.DETECTOR.WEIGHTS, rs.DETECTOR.OPTS, cfg.MODEL.DEVICE)
        roi_heads = build_roi_heads(cfg, {})
        if rs.HEAD.WEIGHTS:
            load_head_weights(roi_heads, rs.HEAD.WEIGHTS)
        return {
            "detector": build_detector(det_cfg),
            "roi_heads": roi_heads,
            "input_format": cfg.INPUT.FORMAT,
            "detector_input_format": det_cfg.INPUT.FORMAT,
            "detector_min_size": det_cfg.INPUT.MIN_SIZE_TEST,
            "detector_max_size": det_cfg.INPUT.MAX_SIZE_TEST,
            "per_region": rs.SCORE.MODE == "per_region",
            "use_box_scores": rs.SCORE.USE_BOX_SCORES,
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.eval()  # frozen: BatchNorm statistics and dropout never change
        return self

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """The inputs' images as one uint8 RGB batch on the model's device (:func:`~.pixels.rgb_batch`)."""
        return rgb_batch(batched_inputs, self.input_format, self.device)

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> Instances:
        """
        Run the detector on one input image.

        Args:
            image: [3, H, W] in ``INPUT.FORMAT`` (uint8 values).

        Returns:
            Instances of size (H, W) with the detector's ``proposal_boxes`` (XYXY in the input's
            pixels, empty boxes dropped) and ``objectness_logits`` (logit of its scores), in the
            detector's order.
        """
        h, w = image.shape[-2:]
        x = image.detach().to("cpu").float()
        if self.input_format != self.detector_input_format:
            x = x.flip(0)
        hwc = x.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        resized = self.detector_resize.get_transform(hwc).apply_image(hwc)
        det_input = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        out = self.detector([{"image": det_input, "height": h, "width": w}])[0]
        if "instances" in out:
            det = out["instances"]
            boxes, scores = det.pred_boxes, det.scores if det.has("scores") else None
            logits = None if scores is None else score_logits(scores)
        elif "proposals" in out:
            det = out["proposals"]
            boxes = det.proposal_boxes
            logits = det.objectness_logits.float() if det.has("objectness_logits") else None
        else:
            raise ValueError(
                f"The detector ({type(self.detector).__name__}) returned {sorted(out)}; RegionSpotRelabel "
                "needs 'instances' (pred_boxes, scores) or 'proposals'."
            )
        boxes = Boxes(boxes.tensor.to(self.device).float())
        keep = boxes.nonempty()
        regions = Instances((int(h), int(w)))
        regions.proposal_boxes = boxes[keep]
        if logits is not None:
            regions.objectness_logits = logits.to(self.device)[keep]
        return regions

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2's list of dicts: ``image`` [3, H, W] in INPUT.FORMAT,
                ``height``/``width`` (output size); ``instances`` (GT) in training.

        Returns:
            training: dict of losses (GT boxes as prompts); inference: list of ``{"instances": ...}``.
        """
        if not self.training:
            return self.inference(batched_inputs)
        targets = [x["instances"].to(self.device) for x in batched_inputs]
        return self.roi_heads.losses(self.preprocess_image(batched_inputs), targets, batch_vocabulary(batched_inputs))

    def inference(
        self,
        batched_inputs: List[Dict],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """
        Args:
            batched_inputs: as in :meth:`forward`.
            detected_instances: known boxes per image (``pred_boxes`` in the input image's pixels):
                the detector is skipped and each box is classified, in the given order.
            do_postprocess: rescale to the requested ``height``/``width``.

        Returns:
            list of ``{"instances": Instances}`` (``pred_boxes``, ``scores``, ``pred_classes``,
            ``pred_masks``).
        """
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        if detected_instances is not None:
            results = self.roi_heads.classify_given_boxes(images, [d.to(self.device) for d in detected_instances])
        else:
            regions = [self.detect(x["image"]) for x in batched_inputs]
            if self.per_region:
                results = self._per_region(images, regions)
            else:
                results, _ = self.roi_heads(images, {}, regions, None)
        if not do_postprocess:
            return results
        return [
            {"instances": rescale_results(r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1]))}
            for r, x in zip(results, batched_inputs)
        ]

    def _per_region(self, images: ImageList, regions: List[Instances]) -> List[Instances]:
        given = []
        for r in regions:
            g = Instances(r.image_size)
            g.pred_boxes = r.proposal_boxes
            given.append(g)
        results = self.roi_heads.classify_given_boxes(images, given)
        if self.use_box_scores:
            for res, r in zip(results, regions):
                if r.has("objectness_logits"):
                    res.scores = res.scores * r.objectness_logits.to(res.scores).sigmoid()
        return results
