"""Interactive use, in the manner of SAM's predictor: set an image once, ask about many regions."""
import logging
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from detectron2.modeling import build_model

from .checkpoint import RegionSpotCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["RegionSpotPredictor"]


class RegionSpotPredictor:
    """
    Recognise regions of one image at a time with a RegionSpot model.

    Example::

        predictor = RegionSpotPredictor(cfg)
        predictor.set_vocabulary(["cat", "dog", "sofa"])
        predictor.set_image(image)            # [H, W, 3] uint8 RGB
        out = predictor.predict(boxes)        # [N, 4] XYXY pixels
        out["classes"], out["scores"], out["masks"]

    The SAM view is the stock ``SamPredictor``'s and the CLIP view one bilinear resize of the
    whole image, so outputs match the authors' predictor for the same weights.

    Args:
        cfg: a config with ``MODEL.META_ARCHITECTURE = "RegionSpot"`` (see ``configs/``);
            ``MODEL.WEIGHTS`` is loaded when set.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        self.head = self.model.roi_heads
        self._state = None
        self._clip_features = None

    @property
    def class_names(self):
        return list(self.head.class_names)

    def set_vocabulary(self, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None):
        """Classes to recognise from now on (text embeddings cached on disk)."""
        self.head.set_vocabulary(class_names, embeddings)

    def set_image(self, image: np.ndarray, image_format: str = "RGB"):
        """
        Run SAM's image encoder and CLIP on an image.

        Args:
            image: [H, W, 3] uint8 image.
            image_format: "RGB" or "BGR" (OpenCV's order).
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"set_image expects an [H, W, 3] uint8 array, got shape {image.shape} dtype {image.dtype}."
            )
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format={image_format!r}: use 'RGB' or 'BGR'.")
        if image_format == "BGR":
            image = image[:, :, ::-1]
        image = np.ascontiguousarray(image)
        self._state, self._clip_features = self.head.encode_image(image)

    @torch.no_grad()
    def predict(
        self,
        boxes=None,
        point_coords=None,
        point_labels=None,
        return_masks: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """
        Recognise N regions of the current image.

        Args:
            boxes: [N, 4] XYXY boxes in image pixels (array or tensor), or None.
            point_coords: [N, P, 2] XY click prompts in pixels, or None.
            point_labels: [N, P] 1 (foreground) / 0 (background) for ``point_coords``.
            return_masks: also return SAM's masks (skipping them saves the mask up-sampling).

        Returns:
            dict with ``logits`` [N, C] (scaled cosine), ``scores`` [N, C] (softmax), ``classes``
            [N], ``mask_scores`` [N] (SAM's IoU prediction) and, with ``return_masks``, ``masks``
            [N, H, W] bool at the image's size.
        """
        if self._state is None:
            raise RuntimeError("Call set_image(image) before predict().")
        if boxes is None and point_coords is None:
            raise ValueError("predict() needs boxes [N, 4] or point_coords [N, P, 2].")
        if boxes is not None:
            boxes = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be [N, 4] XYXY, got shape {list(boxes.shape)}.")
        if point_coords is not None and point_labels is None:
            raise ValueError("point_coords need point_labels (1 foreground, 0 background).")
        head = self.head
        out = head.sam.decode_prompts(
            self._state, boxes, point_coords, point_labels, with_masks=return_masks,
            chunk_size=head.prompt_chunk_size,
        )
        logits = head.logits(head.region_embeddings(out.tokens[None], self._clip_features)[0])
        scores = logits.softmax(dim=-1)
        result = {
            "logits": logits,
            "scores": scores,
            "classes": scores.argmax(dim=-1),
            "mask_scores": out.mask_scores,
        }
        if return_masks:
            result["masks"] = head.sam.postprocess_masks(out.low_res_masks, self._state)
        return result
