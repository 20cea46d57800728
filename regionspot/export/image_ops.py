"""
The pixel steps of the predictor in numpy (and PIL), for the torch-free runtime:

* SAM's view: ``segment_anything``'s ``ResizeLongestSide.apply_image`` (a PIL bilinear resize of the
  uint8 image to the longest side's target, the other side rounded);
* CLIP's view and SAM's mask up-sampling: ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)``, with or without ``antialias``, as separable weight matrices built the way
  torch computes its source indices and weights.
"""
import numpy as np
from PIL import Image

__all__ = ["preprocess_shape", "sam_resize", "bilinear_weights", "resize_bilinear", "postprocess_masks"]


def preprocess_shape(height: int, width: int, long_side: int):
    """(h, w) of SAM's resized view: the longest side scaled to ``long_side``, the other rounded."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_resize(image: np.ndarray, long_side: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8, as ``ResizeLongestSide(long_side).apply_image``."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def bilinear_weights(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """
    [out_size, in_size] float32 matrix W with ``out = W @ in`` along one axis, as torch's bilinear
    interpolation with ``align_corners=False`` (scale in / out; with ``antialias`` and a downscale the
    triangle filter is widened by the scale, as PIL and torch do).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    w = np.zeros((out_size, in_size), dtype=np.float64)
    if antialias:
        support = float(scale) if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = float(scale) * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            weights = np.clip(1.0 - np.abs((taps - center + 0.5) / support), 0.0, None)
            total = weights.sum()
            w[i, lo:hi] = weights / total if total > 0 else 0.0
        return w.astype(np.float32)
    i0, i1, l0, l1 = _taps(in_size, out_size)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), l0)
    np.add.at(w, (rows, i1), l1)
    return w.astype(np.float32)


def _taps(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear interpolation (align_corners=False, no antialias)."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = (np.float32(1.0) - l1).astype(np.float32)
    return i0, i1, l0, l1


def _resize_2tap(x: np.ndarray, size) -> np.ndarray:
    """[N, H, W] -> [N, h, w], torch's bilinear (no antialias) as two taps per axis, columns first."""
    (y0, y1, ly0, ly1), (x0, x1, lx0, lx1) = _taps(x.shape[1], size[0]), _taps(x.shape[2], size[1])
    t = x[:, :, x0] * lx0 + x[:, :, x1] * lx1
    return t[:, y0] * ly0[:, None] + t[:, y1] * ly1[:, None]


def resize_bilinear(x: np.ndarray, size, antialias: bool = False) -> np.ndarray:
    """[..., H, W] float32 -> [..., h, w] float32 (see :func:`bilinear_weights`)."""
    h, w = size
    wy = bilinear_weights(x.shape[-2], h, antialias)
    wx = bilinear_weights(x.shape[-1], w, antialias)
    return np.matmul(np.matmul(wy, x), wx.T)


def postprocess_masks(
    low_res: np.ndarray, input_size, original_size, image_size: int, threshold: float = 0.0, chunk: int = 8
) -> np.ndarray:
    """
    [N, 1, m, m] mask logits -> [N, H, W] bool masks, as ``Sam.postprocess_masks`` and the threshold:
    up-sampled to SAM's square input, cropped to the resized image, resized to the original size.
    """
    n = low_res.shape[0]
    height, width = original_size
    out = np.zeros((n, height, width), dtype=bool)
    if n == 0:
        return out
    h, w = input_size
    for start in range(0, n, chunk):
        x = low_res[start : start + chunk, 0].astype(np.float32)
        x = _resize_2tap(x, (image_size, image_size))[:, :h, :w]
        out[start : start + chunk] = _resize_2tap(np.ascontiguousarray(x), (height, width)) > threshold
    return out
