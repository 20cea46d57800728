"""SAM masks of detections, up-sampled only when (and at the size) they are needed."""
from typing import Optional, Tuple

import torch

from torch.nn import functional as F

from detectron2.structures import BitMasks, ROIMasks

__all__ = ["SamMasks", "MASK_RESIZE_MODES"]

MASK_RESIZE_MODES = ("authors", "fixed")


class SamMasks(ROIMasks):
    """
    The masks of K detections, kept as SAM's low-resolution logits of the R distinct regions they
    came from (a region kept with several classes shares one mask).

    ``to_bitmasks(boxes, height, width)`` up-samples the logits with the stock
    ``Sam.postprocess_masks`` (to the encoder frame, crop to the resized image, then to ``height`` x
    ``width``) and only then thresholds, once per distinct region. Being an ``ROIMasks``, it goes through detectron2's
    ``detector_postprocess`` unchanged, so it also works inside ``GeneralizedRCNN``.

    When the model saw a resized image (``source_size``) and the masks are asked at another size,
    ``resize`` says how: "fixed" up-samples the logits straight to that size, "authors" thresholds
    at ``source_size`` first and resizes the binary masks with nearest neighbour, as the authors'
    evaluation does.

    Args:
        low_res: [R, 1, m, m] mask logits of the regions.
        index: [K] region of each detection.
        sam: the ``segment_anything.Sam`` that made them (its post-processing and threshold).
        input_size: (h, w) of the image inside SAM's input.
        source_size: (h, w) of the image SAM encoded (before its own resize); None: unknown.
        resize: "fixed" or "authors".
    """

    def __init__(
        self,
        low_res: torch.Tensor,
        index: torch.Tensor,
        sam,
        input_size: Tuple[int, int],
        source_size: Optional[Tuple[int, int]] = None,
        resize: str = "fixed",
    ):
        if resize not in MASK_RESIZE_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE={resize!r}: use one of {MASK_RESIZE_MODES}.")
        self.low_res = low_res
        self.index = index
        self.sam = sam
        self.input_size = tuple(int(s) for s in input_size)
        self.source_size = None if source_size is None else tuple(int(s) for s in source_size)
        self.resize = resize

    # Regions up-sampled at once in to_bitmasks (bounds its memory to ~4 MiB of logits per region).
    chunk_size = 16

    @property
    def tensor(self):  # ROIMasks API: the [K, ...] tensor is never built here
        raise AttributeError("SamMasks keeps low-resolution logits; call to_bitmasks(boxes, height, width).")

    def _like(self, low_res, index):
        return SamMasks(low_res, index, self.sam, self.input_size, self.source_size, self.resize)

    def to(self, device) -> "SamMasks":
        return self._like(self.low_res.to(device), self.index.to(device))

    @property
    def device(self):
        return self.low_res.device

    def __len__(self):
        return self.index.shape[0]

    def __getitem__(self, item) -> "SamMasks":
        index = self.index[item]
        if index.dim() == 0:
            index = index.view(1)
        return self._like(self.low_res, index)

    def __repr__(self):
        return f"SamMasks(num_instances={len(self)}, num_regions={self.low_res.shape[0]})"

    @torch.no_grad()
    def to_bitmasks(self, boxes=None, height=None, width=None, threshold=None) -> BitMasks:
        """
        Args:
            boxes: unused (the masks are image-sized already).
            height, width: output size (the image size the detections refer to).
            threshold: ignored; SAM's own threshold on the logits is used.

        Returns:
            BitMasks [K, height, width].
        """
        del boxes, threshold
        height, width = int(height), int(width)
        if len(self) == 0:
            return BitMasks(torch.zeros((0, height, width), dtype=torch.bool, device=self.device))
        regions, inverse = torch.unique(self.index, return_inverse=True)
        threshold_size = (height, width)
        if self.resize == "authors" and self.source_size is not None:
            threshold_size = self.source_size
        # A few regions at a time: SAM's post-processing first up-samples to its 1024 x 1024 frame.
        masks = torch.empty((len(regions), height, width), dtype=torch.bool, device=self.device)
        for start in range(0, len(regions), self.chunk_size):
            chunk = self.low_res[regions[start : start + self.chunk_size]].float()
            logits = self.sam.postprocess_masks(chunk, self.input_size, threshold_size)
            binary = logits[:, 0] > self.sam.mask_threshold
            if threshold_size != (height, width):
                binary = F.interpolate(binary[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5
            masks[start : start + self.chunk_size] = binary
        return BitMasks(masks[inverse])
