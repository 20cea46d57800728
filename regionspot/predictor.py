"""Interactive use, in the manner of SAM's predictor: set an image once, ask about many regions."""
import logging
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from detectron2.modeling import build_model

from .checkpoint import RegionSpotCheckpointer, check_head_weights
from .modeling.input_checks import (
    EMPTY_BOX_POLICIES,
    check_boxes,
    check_points,
    describe_empty_boxes,
    image_to_rgb_uint8,
)
from .modeling.pixels import as_rgb_tensor
from .modeling.text_embeddings import validate_class_names
from .modeling.zero_shot_classifier import single_class_softmax_message

logger = logging.getLogger(__name__)

__all__ = ["RegionSpotPredictor"]


class RegionSpotPredictor:
    """
    Recognise regions of one image at a time with a RegionSpot model.

    Example::

        predictor = RegionSpotPredictor(cfg)
        predictor.set_vocabulary(["cat", "dog", "sofa"])
        predictor.set_image(image)            # [H, W, 3] uint8 RGB numpy
        out = predictor.predict(boxes)        # [N, 4] XYXY pixels
        out["classes"], out["scores"], out["masks"]

    ``set_torch_image`` / ``predict_torch`` are the same on tensors (a [3, H, W] uint8 RGB image,
    [N, 4] boxes), which stay on the model's device: no numpy round trip.

    The SAM view is the stock ``SamPredictor``'s and the CLIP view one bilinear resize of the
    whole image, so outputs match the authors' predictor for the same weights.

    Every input is checked where it enters (``regionspot/modeling/input_checks.py`` lists the
    rules): a bad one raises ``ValueError`` naming it and the fix, so no NaN and no silently
    wrong score comes out. Boxes that are empty once clipped to the image (zero width or height,
    or entirely outside it) are the one case with a choice, ``empty_boxes``:

    * "warn" (default): scored like the others, a warning names them and the output's
      ``empty_box`` flags them. They are kept rather than dropped because the regions of a call
      attend to each other, so dropping one changes the others' logits, and the authors' model
      keeps every box (their evaluation, reproduced through this predictor, includes boxes
      entirely outside the image);
    * "error": refused with ``ValueError``, for interactive use where such a box is a mistake.

    Args:
        cfg: a config with ``MODEL.META_ARCHITECTURE = "RegionSpot"`` (see ``configs/``);
            ``MODEL.WEIGHTS`` is loaded when set.
        empty_boxes: "warn" or "error", see above.
    """

    def __init__(self, cfg, empty_boxes: str = "warn"):
        if empty_boxes not in EMPTY_BOX_POLICIES:
            raise ValueError(f"empty_boxes={empty_boxes!r}: use one of {EMPTY_BOX_POLICIES}.")
        self.empty_boxes = empty_boxes
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        # A fusion module nothing loaded is refused unless MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM says so.
        check_head_weights(self.cfg, self.model)
        self.head = self.model.roi_heads
        self._state = None
        self._clip_features = None

    @property
    def class_names(self):
        return list(self.head.class_names)

    def set_vocabulary(self, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None):
        """
        Classes to recognise from now on (text embeddings cached on disk).

        Args:
            class_names: C names (checked as in ``RegionSpotROIHeads.set_vocabulary``: None, empty,
                non-str and repeated names are refused).
            embeddings: optional [C, D_t] L2-normalised text embeddings.

        Raises:
            ValueError: bad names or embeddings, or one class while scores are a softmax over the
                vocabulary (every score would be 1.0; the message says what to do instead). The
                previous vocabulary stays in use.
        """
        class_names = validate_class_names(class_names)
        self._check_scores_are_informative(class_names)
        self.head.set_vocabulary(class_names, embeddings)

    def _check_scores_are_informative(self, class_names: Sequence[str]) -> None:
        # The evaluation path only warns (benchmarks such as ODinW-13 have one-class datasets);
        # here each score is read on its own, and a constant 1.0 would be read as certainty.
        if len(class_names) == 1 and self.head.classifier.class_score == "softmax":
            raise ValueError(single_class_softmax_message(class_names[0]))

    def set_image(self, image: np.ndarray, image_format: str = "RGB"):
        """
        Run SAM's image encoder and CLIP on an image.

        Args:
            image: [H, W, 3] uint8 image. Also accepted: [H, W] and [H, W, 1] grayscale (converted to
                RGB), [H, W, 4] with alpha and [H, W, 2] gray + alpha (alpha dropped, not
                composited, as PIL's ``convert("RGB")``), non-contiguous arrays and CPU tensors.
                Refused with the conversion to write: float images, 16-bit (uint16) and other
                non-uint8 images, channel-first [C, H, W] arrays, empty images (see
                :func:`regionspot.modeling.input_checks.image_to_rgb_uint8`).
            image_format: "RGB" or "BGR" (OpenCV's order; BGRA for 4 channels).

        Raises:
            ValueError: a refused image; the previous image stays set.
        """
        self.set_torch_image(torch.from_numpy(image_to_rgb_uint8(image, image_format)).permute(2, 0, 1))

    def set_torch_image(self, image: torch.Tensor):
        """
        :meth:`set_image` for a tensor: a [3, H, W] uint8 RGB image on any device (moved to the
        model's once).

        Raises:
            ValueError: another shape or dtype (convert with ``image.round().clamp(0, 255).byte()``
                for float images in 0..255); the previous image stays set.
        """
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            what = f"{image.dtype} tensor of shape {list(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"set_torch_image() takes a [3, H, W] uint8 RGB tensor, got a {what}; for [H, W, 3] numpy "
                "images use set_image()."
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"set_torch_image(): the image is empty ({list(image.shape)}).")
        image = as_rgb_tensor(image, self.head.pixel_mean.device)
        self._state, self._clip_features = self.head.encode_image(image)

    @torch.no_grad()
    def predict(
        self,
        boxes=None,
        point_coords=None,
        point_labels=None,
        return_masks: bool = True,
        return_embeddings: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """
        Recognise N regions of the current image.

        Args:
            boxes: [N, 4] XYXY boxes in image pixels (array, tensor or nested list), or None.
                NaN/inf and inverted (x1 < x0 or y1 < y0, e.g. XYWH) boxes are refused; boxes
                partly outside the image are fine; boxes empty once clipped to the image follow
                ``empty_boxes`` (see the class).
            point_coords: [N, P, 2] XY click prompts in pixels, or None; points outside the image
                are refused.
            point_labels: [N, P] 1 (foreground) / 0 (background) for ``point_coords``; -1 marks
                padding (SAM's "not a point"), for regions with fewer clicks than P.
            return_masks: also return SAM's masks (skipping them saves the mask up-sampling).
            return_embeddings: also return ``embeddings`` [N, D_t], the L2-normalised region
                embeddings the logits are computed from (``logits = logit_scale * embeddings @
                text_embeddings.T``), to store and re-score against other vocabularies later.

        Returns:
            dict with ``logits`` [N, C] (scaled cosine), ``scores`` [N, C] (softmax over the
            vocabulary, or per-class sigmoid with ``class_score="sigmoid"``), ``classes`` [N],
            ``mask_scores`` [N] (SAM's IoU prediction), ``empty_box`` [N] bool (True where the box
            is empty once clipped to the image; all False without boxes) and, with
            ``return_masks``, ``masks`` [N, H, W] bool at the image's size; with
            ``return_embeddings``, ``embeddings`` [N, D_t].

        Raises:
            RuntimeError: no image set.
            ValueError: a refused prompt, or a one-class vocabulary with softmax scores.
        """
        if self._state is None:
            raise RuntimeError("Call set_image(image) before predict().")
        if boxes is None and point_coords is None and point_labels is None:
            raise ValueError("predict() needs boxes [N, 4] or point_coords [N, P, 2] with point_labels [N, P].")
        self._check_scores_are_informative(self.head.class_names)
        image_size = tuple(self._state.original_size)
        empty = None
        if boxes is not None:
            boxes, empty = check_boxes(boxes, image_size, "boxes")
            if bool(empty.any()):
                message = describe_empty_boxes(boxes, empty, image_size, "boxes")
                if self.empty_boxes == "error":
                    raise ValueError(
                        message + " Give boxes that overlap the image (XYXY pixels of the image passed to "
                        "set_image), or drop them."
                    )
                logger.warning(
                    message + " They are scored like the others, but their scores describe no image "
                    "content; out['empty_box'] is True for them."
                )
        point_coords, point_labels = check_points(
            point_coords, point_labels, image_size, None if boxes is None else len(boxes)
        )
        return self._recognize(boxes, point_coords, point_labels, empty, return_masks, return_embeddings)

    @torch.no_grad()
    def predict_torch(
        self,
        boxes: Optional[torch.Tensor] = None,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        return_masks: bool = True,
        return_embeddings: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """
        :meth:`predict` for tensors (any device; they are used on the model's device, with the same
        checks), e.g. boxes from a detector that ran on the GPU. Same outputs as :meth:`predict`.
        """
        for name, value in (("boxes", boxes), ("point_coords", point_coords), ("point_labels", point_labels)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"predict_torch(): {name} must be a tensor, got {type(value).__name__}; use predict().")
        return self.predict(boxes, point_coords, point_labels, return_masks, return_embeddings)

    def _recognize(
        self, boxes, point_coords, point_labels, empty, return_masks: bool, return_embeddings: bool = False
    ) -> Dict[str, torch.Tensor]:
        head = self.head
        device = head.pixel_mean.device
        out = head.sam.decode_prompts(
            self._state,
            None if boxes is None else boxes.to(device),
            None if point_coords is None else point_coords.to(device),
            None if point_labels is None else point_labels.to(device),
            with_masks=return_masks,
            chunk_size=head.prompt_chunk_size,
        )
        region = head.region_embeddings(out.tokens[None], self._clip_features)[0]
        logits = head.classifier(region)
        scores = head.classifier.class_scores(logits)
        if empty is None:
            empty = torch.zeros(len(logits), dtype=torch.bool)
        result = {
            "logits": logits,
            "scores": scores,
            "classes": logits.argmax(dim=-1),
            "mask_scores": out.mask_scores,
            "empty_box": empty.to(logits.device),
        }
        if return_masks:
            result["masks"] = head.sam.postprocess_masks(out.low_res_masks, self._state)
        if return_embeddings:
            # Normalised exactly as region_text_logits does, so the stored rows give the same logits.
            result["embeddings"] = region / (region.norm(dim=-1, keepdim=True) + 1e-7)
        return result
