"""SAM masks of detections, up-sampled only when (and at the size) they are needed."""
from typing import Tuple

import torch

from detectron2.structures import BitMasks, ROIMasks

__all__ = ["SamMasks"]


class SamMasks(ROIMasks):
    """
    The masks of K detections, kept as SAM's low-resolution logits of the R distinct regions they
    came from (a region kept with several classes shares one mask).

    ``to_bitmasks(boxes, height, width)`` up-samples the logits with the stock
    ``Sam.postprocess_masks`` (to the encoder frame, crop to the resized image, then to ``height`` x
    ``width``) and only then thresholds, once per distinct region. Being an ``ROIMasks``, it goes through detectron2's
    ``detector_postprocess`` unchanged, so it also works inside ``GeneralizedRCNN``.

    Args:
        low_res: [R, 1, m, m] mask logits of the regions.
        index: [K] region of each detection.
        sam: the ``segment_anything.Sam`` that made them (its post-processing and threshold).
        input_size: (h, w) of the image inside SAM's input.
    """

    def __init__(self, low_res: torch.Tensor, index: torch.Tensor, sam, input_size: Tuple[int, int]):
        self.low_res = low_res
        self.index = index
        self.sam = sam
        self.input_size = tuple(int(s) for s in input_size)

    # Regions up-sampled at once in to_bitmasks (bounds its memory to ~4 MiB of logits per region).
    chunk_size = 16

    @property
    def tensor(self):  # ROIMasks API: the [K, ...] tensor is never built here
        raise AttributeError("SamMasks keeps low-resolution logits; call to_bitmasks(boxes, height, width).")

    def _like(self, low_res, index):
        return SamMasks(low_res, index, self.sam, self.input_size)

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
        # A few regions at a time: SAM's post-processing first up-samples to its 1024 x 1024 frame.
        masks = torch.empty((len(regions), height, width), dtype=torch.bool, device=self.device)
        for start in range(0, len(regions), self.chunk_size):
            chunk = self.low_res[regions[start : start + self.chunk_size]].float()
            logits = self.sam.postprocess_masks(chunk, self.input_size, (height, width))
            masks[start : start + self.chunk_size] = logits[:, 0] > self.sam.mask_threshold
        return BitMasks(masks[inverse])
