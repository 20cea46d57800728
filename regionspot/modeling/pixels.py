"""
The one pixel path: how images reach SAM and CLIP.

SAM and CLIP read the image itself, not a backbone's features. Everything that hands pixels to
them goes through this module:

* :func:`rgb_batch` makes the batch of the ``RegionSpot`` / ``RegionSpotRelabel`` meta-architectures:
  the mapper's uint8 images, converted to RGB, moved to the model's device once, never normalised;
* :func:`rgb_images` gives the per-image [3, h, w] uint8 RGB views of a batch for the head. A uint8
  batch is taken as it is (RGB pixels); a floating-point batch is a detector's, normalised for its
  backbone (a ``GeneralizedRCNN`` with ``RegionSpotROIHeads``), and is un-normalised once here;
* :func:`as_rgb_tensor` takes one image from a user (numpy [H, W, 3] or a [3, H, W] tensor).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from detectron2.structures import ImageList

__all__ = ["rgb_batch", "rgb_images", "as_rgb_tensor", "image_hw", "PIXEL_FORMATS"]

PIXEL_FORMATS = ("RGB", "BGR")

Image = Union[np.ndarray, torch.Tensor]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    # Values already integral in [0, 255] (the mapper's images) are unchanged.
    return x if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8)


def rgb_batch(batched_inputs: Sequence[Dict], input_format: str, device: torch.device) -> ImageList:
    """
    The batch's images as one uint8 RGB ImageList on ``device``.

    Args:
        batched_inputs: detectron2's list of dicts, ``image`` [3, H, W] in ``input_format``
            (uint8, as detectron2's mappers make it; other dtypes are rounded into uint8).
        input_format: "RGB" or "BGR" (``INPUT.FORMAT``).
        device: the model's device.

    Returns:
        ImageList of [B, 3, H_max, W_max] uint8 RGB (padded with zeros) and each image's size.
    """
    if input_format not in PIXEL_FORMATS:
        raise ValueError(f"INPUT.FORMAT={input_format!r}: RegionSpot reads RGB or BGR images.")
    images = []
    for x in batched_inputs:
        image = _to_uint8(x["image"].to(device, non_blocking=True))
        images.append(image.flip(0) if input_format == "BGR" else image)
    return ImageList.from_tensors(images)


def rgb_images(
    images: ImageList,
    pixel_mean: Optional[torch.Tensor] = None,
    pixel_std: Optional[torch.Tensor] = None,
    input_format: str = "RGB",
) -> List[torch.Tensor]:
    """
    Each image of a batch as a [3, h, w] uint8 RGB tensor, cropped to its size, on the batch's device.

    Args:
        images: a uint8 RGB batch (:func:`rgb_batch`), taken as it is; or a float batch normalised
            as ``(x - pixel_mean) / pixel_std`` in ``input_format`` (a detector's), un-normalised here.
        pixel_mean, pixel_std: [3, 1, 1] normalisation of a float batch.
        input_format: channel order of a float batch.
    """
    tensor = images.tensor
    if tensor.dtype == torch.uint8:
        return [tensor[i, :, :h, :w] for i, (h, w) in enumerate(images.image_sizes)]
    if pixel_mean is None or pixel_std is None:
        raise ValueError(
            "A floating-point image batch needs the pixel mean and std it was normalised with "
            "(MODEL.PIXEL_MEAN / MODEL.PIXEL_STD) to recover the pixels SAM and CLIP read."
        )
    mean, std = pixel_mean.to(tensor).view(-1, 1, 1), pixel_std.to(tensor).view(-1, 1, 1)
    out = []
    for i, (h, w) in enumerate(images.image_sizes):
        x = tensor[i, :, :h, :w] * std + mean
        if input_format == "BGR":
            x = x.flip(0)
        out.append(_to_uint8(x))
    return out


def as_rgb_tensor(image: Image, device: Optional[torch.device] = None) -> torch.Tensor:
    """
    One RGB uint8 image as a [3, H, W] tensor on ``device``: an [H, W, 3] numpy array (checked by
    the caller, e.g. ``input_checks.image_to_rgb_uint8``) or a [3, H, W] uint8 tensor.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Expected an [H, W, 3] uint8 RGB image, got {image.dtype} of shape {list(image.shape)}."
            )
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = list(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"Expected a [3, H, W] RGB image tensor (or [H, W, 3] uint8 numpy), got {shape}.")
    return _to_uint8(image.to(device) if device is not None else image)


def image_hw(image: Image) -> Tuple[int, int]:
    """(H, W) of an [H, W, 3] numpy image or a [3, H, W] tensor."""
    if isinstance(image, np.ndarray):
        return tuple(int(s) for s in image.shape[:2])
    return tuple(int(s) for s in image.shape[-2:])
