"""
Checks of what a user hands RegionSpot, made where it enters: boxes, point prompts, images and text
embeddings (class names are checked by :func:`regionspot.modeling.text_embeddings.validate_class_names`).

A bad input either gives the correct result of its canonical form (a grayscale image is the RGB
image with three equal channels) or a ``ValueError`` that names the input, the offending entries and
the fix. Nothing bad reaches the model: the regions of an image attend to each other in the fusion
module, so a single NaN box would turn every logit of every region of that image into NaN.

What each input may be and what happens otherwise (the same table is in the report of the change):

===================  ==============================================  ==========================================
input                check                                           what happens
===================  ==============================================  ==========================================
boxes                shape [N, 4], numeric                           ValueError (one box: pass ``[[x0, y0, x1, y1]]``)
boxes                NaN / inf coordinate                            ValueError naming the rows and values
boxes                x1 < x0 or y1 < y0                              ValueError naming the rows (XYXY, not XYWH)
boxes                empty once clipped to the image (zero area,     kept and scored; see :func:`check_boxes`
                     or entirely outside it)                         for each caller's policy
boxes                partly outside the image                        accepted as they are (SAM encodes any
                                                                     coordinate; the authors do not clip)
point_coords         shape [N, P, 2], P >= 1, numeric, finite        ValueError
point_labels         shape [N, P] equal to the coords', values in    ValueError (2 and 3 are SAM's internal
                     {-1, 0, 1}                                      box-corner labels)
point labels -1      SAM's "not a point" padding                     accepted; its coordinates are ignored
point_coords         labelled point outside [0, W] x [0, H]          ValueError naming region, point, values
regions              a region with only padding points and no box    ValueError
image                uint8                                           float / uint16 / other dtypes: ValueError
                                                                     with the conversion to write
image                [H, W], [H, W, 1]                               converted to RGB (channel repeated)
image                [H, W, 2], [H, W, 4]                            alpha dropped (as PIL's convert("RGB"))
image                [C, H, W] with C in (1, 3, 4)                   ValueError suggesting the transpose
image                H == 0 or W == 0, ndim not 2 or 3               ValueError
text embeddings      [C, D], finite, rows of norm 1                  ValueError
===================  ==============================================  ==========================================
"""
import logging
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EMPTY_BOX_POLICIES",
    "POINT_LABELS",
    "check_boxes",
    "check_points",
    "check_text_embeddings",
    "describe_empty_boxes",
    "image_to_rgb_uint8",
    "check_region_prompts",
]

# What happens to a box that is empty once clipped to the image, where the caller decides.
EMPTY_BOX_POLICIES = ("warn", "error")
# SAM's point labels: 1 foreground click, 0 background click, -1 "not a point" (padding).
POINT_LABELS = (-1, 0, 1)
# Rows listed in a message before the rest are only counted.
_MAX_LISTED = 10
# Tolerance on the norm of given text embeddings (fp16-rounded embeddings are off by ~1e-3).
_NORM_TOLERANCE = 1e-2
# Conversions already logged (each is logged once per process, not once per image).
_LOGGED = set()


def _log_once(key: str, message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(message)


def _listing(indices: Sequence, values: Sequence) -> str:
    """"row 3: [1.0, 2.0, nan, 4.0], row 7: ..." with at most ``_MAX_LISTED`` entries."""
    parts = [f"{i}: {v}" for i, v in zip(indices[:_MAX_LISTED], values[:_MAX_LISTED])]
    more = len(indices) - _MAX_LISTED
    return ", ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _as_float_tensor(x, name: str, example: str) -> torch.Tensor:
    """A tensor (kept on its device; integer tensors become float64) or array-like -> float tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach() if x.is_floating_point() else x.detach().to(torch.float64)
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers shaped {example}; could not read it as one array: {e}") from e
    return torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------
# Boxes
def check_boxes(boxes, image_size: Tuple[int, int], name: str = "boxes") -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Check [N, 4] XYXY pixel boxes of an image of ``image_size``.

    Refused (``ValueError``): a shape other than [N, 4], non-numeric entries, a NaN or infinite
    coordinate (the regions attend to each other, so one such box makes every logit of the image
    NaN), and inverted boxes (x1 < x0 or y1 < y0; the usual cause is XYWH boxes).

    Not refused, only reported in the returned mask: boxes that are empty once clipped to the image,
    i.e. of zero width or height, or entirely outside it. What happens to them is the caller's
    policy: the evaluation path keeps them as prompts and drops their detections after scoring (the
    authors' protocol), the predictor and given boxes warn and flag them (``empty_box``). Boxes
    partly outside the image are fine: SAM's prompt encoder encodes any coordinate, and the authors
    do not clip prompts.

    Args:
        boxes: [N, 4] array, tensor (any device) or nested list.
        image_size: (H, W) of the image the boxes refer to.
        name: how the input is called in messages.

    Returns:
        (boxes as a float tensor, [N] bool tensor on the same device: True where the box is empty
        once clipped to the image). A float tensor is returned as it is.
    """
    b = _as_float_tensor(boxes, name, "[N, 4] XYXY")
    if b.ndim == 1 and b.numel() == 4:
        raise ValueError(
            f"{name} must be [N, 4] XYXY, got one box of shape [4]; pass a list of boxes: [[x0, y0, x1, y1]]."
        )
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] XYXY, got shape {list(b.shape)}.")
    finite = torch.isfinite(b).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} rows {rows[:_MAX_LISTED]} are not finite ({_listing(rows, b[rows].tolist())}). A NaN or "
            "infinite box would make the logits of every region of the image NaN (the regions attend to "
            "each other): fix or drop those rows."
        )
    inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bool(inverted.any()):
        rows = inverted.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} rows {rows[:_MAX_LISTED]} have x1 < x0 or y1 < y0 ({_listing(rows, b[rows].tolist())}). "
            "Boxes are XYXY: [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0. XYWH boxes ([x, y, width, "
            "height]) are the likely cause: convert them with detectron2's BoxMode.convert(boxes, "
            "BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)."
        )
    h, w = image_size
    x0, x1 = b[:, 0].clamp(0, w), b[:, 2].clamp(0, w)
    y0, y1 = b[:, 1].clamp(0, h), b[:, 3].clamp(0, h)
    # As detectron2's Boxes.clip() followed by nonempty(): what the evaluation path drops.
    empty = (x1 <= x0) | (y1 <= y0)
    return b, empty


def check_region_prompts(
    regions, image_size: Tuple[int, int], where: str = "", box_field: str = "proposal_boxes"
) -> Optional[torch.Tensor]:
    """
    Check the prompts of one image before anything is computed with them.

    Refused (``ValueError`` naming the field, the image and the rows): NaN/inf or inverted
    boxes (:func:`~regionspot.modeling.input_checks.check_boxes`), bad point prompts
    (:func:`~regionspot.modeling.input_checks.check_points`: shapes, labels outside
    {-1, 0, 1}, points outside the image, ...), NaN ``objectness_logits`` (±inf is fine: its
    sigmoid is exactly 1 or 0). Boxes that are empty once clipped to the image are not refused:
    their mask is returned, and each caller decides (see ``RegionSpotROIHeads.recognize``).

    Args:
        regions: detectron2 ``Instances`` with ``proposal_boxes`` and optional ``objectness_logits``, ``point_coords``,
            ``point_labels``.
        image_size: (H, W) of the image the prompts refer to.
        where: appended to the field names in messages, e.g. "of image 2 of the batch".
        box_field: how the boxes are called in messages.

    Returns:
        [N] bool, True where a box is empty once clipped to the image; None without boxes.
    """
    suffix = f" {where}" if where else ""
    empty = None
    num_boxes = None
    if regions.has("proposal_boxes"):
        boxes = regions.proposal_boxes.tensor
        _, empty = check_boxes(boxes, image_size, f"{box_field}{suffix}")
        num_boxes = len(boxes)
    points = regions.point_coords if regions.has("point_coords") else None
    labels = regions.point_labels if regions.has("point_labels") else None
    check_points(points, labels, image_size, num_boxes, f"point_coords{suffix}")
    if regions.has("objectness_logits"):
        nan = torch.isnan(regions.objectness_logits)
        if bool(nan.any()):
            rows = nan.nonzero().flatten().tolist()
            raise ValueError(
                f"objectness_logits{suffix} are NaN at rows {rows[:10]}: a box score must be a number "
                "(a proposal file's scores are probabilities p, stored as logit(p)); fix or drop those rows."
            )
    return empty


def describe_empty_boxes(boxes: torch.Tensor, empty: torch.Tensor, image_size: Tuple[int, int], name: str) -> str:
    """A sentence naming the boxes of ``empty`` (from :func:`check_boxes`) and what they are."""
    rows = empty.nonzero().flatten().tolist()
    h, w = image_size
    return (
        f"{name} rows {rows[:_MAX_LISTED]} are empty once clipped to the {h}x{w} (HxW) image: zero width "
        f"or height, or entirely outside the image ({_listing(rows, boxes[rows].tolist())})."
    )


# ---------------------------------------------------------------------------------------------
# Point prompts
def check_points(
    point_coords,
    point_labels,
    image_size: Tuple[int, int],
    num_boxes: Optional[int] = None,
    name: str = "point_coords",
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """
    Check click prompts of an image of ``image_size``.

    Label -1 is accepted: it is SAM's "not a point" padding, which lets regions with fewer clicks
    share one [N, P] array (SAM itself appends one such point when no box is given). A padding
    point's coordinates are ignored by SAM, so they are not range-checked, but they must be finite.
    Note that padding is not free: SAM sees one more (padding) token, which changes its outputs a
    little, as in ``SamPredictor`` with padded batches.

    Refused (``ValueError``): coordinates without labels or labels without coordinates; shapes
    other than [N, P, 2] / [N, P] with P >= 1; N different from the number of boxes given with
    them; non-finite coordinates; labels other than -1, 0, 1; a region made only of padding points
    and no box (it has no prompt); a labelled point outside [0, W] x [0, H].

    Args:
        point_coords: [N, P, 2] XY pixels (array, tensor or nested list), or None.
        point_labels: [N, P] labels, or None.
        image_size: (H, W) of the image the points refer to.
        num_boxes: number of boxes given with the points (each region then has a box), or None.
        name: how the coordinates are called in messages (labels: ``name`` with "coords" -> "labels").

    Returns:
        (coords as a float tensor, labels as an int64 tensor), or (None, None) without points.
    """
    labels_name = name.replace("coords", "labels") if "coords" in name else f"{name} labels"
    if point_coords is None and point_labels is None:
        return None, None
    if point_coords is None:
        raise ValueError(f"{labels_name} given without {name}: pass both, or neither.")
    if point_labels is None:
        raise ValueError(f"{name} need {labels_name}: [N, P] with 1 (foreground) or 0 (background) per point.")
    coords = _as_float_tensor(point_coords, name, "[N, P, 2] XY")
    labels = _as_float_tensor(point_labels, labels_name, "[N, P]")
    if coords.ndim == 2 and coords.shape[1] == 2:
        raise ValueError(
            f"{name} must be [N, P, 2] (N regions of P clicks each), got shape {list(coords.shape)}; for the "
            f"clicks of one region pass {name}[None] and {labels_name}[None]."
        )
    if coords.ndim != 3 or coords.shape[2] != 2:
        raise ValueError(f"{name} must be [N, P, 2] XY pixels (N regions of P clicks), got shape {list(coords.shape)}.")
    if coords.shape[1] == 0:
        raise ValueError(f"{name} has P = 0 points per region; give at least one, or pass no points at all.")
    if tuple(labels.shape) != tuple(coords.shape[:2]):
        raise ValueError(
            f"{labels_name} must be [N, P] = {list(coords.shape[:2])} to match {name} {list(coords.shape)}, "
            f"got shape {list(labels.shape)}."
        )
    if num_boxes is not None and num_boxes != coords.shape[0]:
        raise ValueError(
            f"{num_boxes} boxes and {coords.shape[0]} regions of points: boxes and points given together "
            "describe the same regions, one row each."
        )
    finite = torch.isfinite(coords).all(dim=2)
    if not bool(finite.all()):
        where = (~finite).nonzero().tolist()
        raise ValueError(
            f"{name} has non-finite coordinates at (region, point) "
            f"{_listing(where, [coords[r, p].tolist() for r, p in where])}; padding points (label -1) need "
            "finite coordinates too (e.g. 0, 0)."
        )
    valid_label = torch.zeros_like(labels, dtype=torch.bool)
    for v in POINT_LABELS:
        valid_label |= labels == v
    if not bool(valid_label.all()):
        where = (~valid_label).nonzero().tolist()
        raise ValueError(
            f"{labels_name} must be 1 (foreground), 0 (background) or -1 (padding, ignored), got "
            f"{_listing(where, [labels[r, p].item() for r, p in where])} at (region, point). (2 and 3 are "
            "SAM's internal labels of box corners: give boxes as boxes.)"
        )
    labels = labels.to(torch.int64)
    clicked = labels >= 0
    if num_boxes is None and coords.shape[0] and not bool(clicked.any(dim=1).all()):
        rows = (~clicked.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(
            f"Regions {rows[:_MAX_LISTED]} have only padding points (label -1) and no box: SAM gets no prompt "
            "for them. Give each region at least one click labelled 1 or 0, or a box."
        )
    h, w = image_size
    x, y = coords[..., 0], coords[..., 1]
    outside = clicked & ((x < 0) | (x > w) | (y < 0) | (y > h))
    if bool(outside.any()):
        where = outside.nonzero().tolist()
        raise ValueError(
            f"{name} has points outside the {h}x{w} (HxW) image at (region, point) "
            f"{_listing(where, [coords[r, p].tolist() for r, p in where])}. Points are XY (x = column, "
            "y = row) in pixels of the image; YX points, or points of a resized image, give this error."
        )
    return coords, labels


# ---------------------------------------------------------------------------------------------
# Images
def _float_fix(image: np.ndarray) -> str:
    finite = np.isfinite(image)
    if not finite.all():
        return "it has NaN or infinite pixels: fix those first"
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0 and hi <= 1:
        return (
            f"its values lie in [{lo:g}, {hi:g}], so it is probably scaled to [0, 1]: pass "
            "(image * 255).round().astype(np.uint8)"
        )
    if lo >= 0 and hi <= 255:
        return f"its values lie in [{lo:g}, {hi:g}]: pass image.round().astype(np.uint8)"
    return f"its values lie in [{lo:g}, {hi:g}], outside [0, 255]: rescale it to 0..255, then .astype(np.uint8)"


def image_to_rgb_uint8(image, image_format: str = "RGB", name: str = "image") -> np.ndarray:
    """
    One image as the contiguous [H, W, 3] uint8 RGB array the frozen models take.

    Accepted and converted:
      * [H, W] or [H, W, 1] grayscale: the channel repeated three times (as PIL's
        ``convert("RGB")``, which detectron2's ``read_image`` and the demo use);
      * [H, W, 4] RGBA (BGRA with ``image_format="BGR"``, as ``cv2.IMREAD_UNCHANGED`` gives) and
        [H, W, 2] gray + alpha: the alpha channel is dropped, not composited: pixels keep their stored
        colour, as PIL's ``convert("RGB")`` does;
      * non-contiguous or negatively strided arrays (e.g. ``image[:, :, ::-1]``): copied;
      * a CPU ``torch.Tensor``: read as its numpy array (the same checks then apply).

    Refused with ``ValueError`` and the fix:
      * float images (the scale, [0, 1] or [0, 255], is a guess the caller must make; the message
        names the conversion that fits the values);
      * uint16 arrays: the right scale depends on the bit depth actually used (16-, 12- or 10-bit
        data are all stored as uint16), which only the caller knows; ``astype(np.uint8)`` would wrap
        around and clipping would make an almost white image. (Files are another matter: a 16-bit
        PNG is full-range by its format, and :func:`regionspot.data.images.read_image` reads it as
        ``value >> 8``; the message points there.)
      * other dtypes (bool masks, signed or wider integers);
      * channel-first [C, H, W] arrays (C in 1, 3, 4 and the last axis not): transpose them;
      * empty images (H or W zero) and arrays of other ranks (one image at a time).
      The last axis decides the layout: [3, 3, 3] is an HWC image of 3x3 pixels.

    Args:
        image: the image (numpy array, array-like, PIL image or CPU tensor).
        image_format: "RGB" or "BGR" (OpenCV's order): the order of the colour channels.
        name: how the input is called in messages.

    Returns:
        [H, W, 3] uint8 RGB, C-contiguous.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format={image_format!r}: use 'RGB' or 'BGR'.")
    if isinstance(image, torch.Tensor):
        if image.device.type != "cpu":
            raise ValueError(f"{name} is a tensor on {image.device}: pass a numpy array (image.cpu().numpy()).")
        image = image.detach().numpy()
    image = np.asarray(image)
    shape = list(image.shape)
    if image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4) and image.shape[0] in (1, 3, 4):
        raise ValueError(
            f"{name} has shape {shape}, channel-first ([C, H, W], as torch tensors are); RegionSpot takes "
            "[H, W, 3] channel-last images: pass np.transpose(image, (1, 2, 0)) (tensor.permute(1, 2, 0) "
            "for a torch tensor)."
        )
    if image.ndim == 4 and image.shape[0] == 1:
        raise ValueError(f"{name} has shape {shape}, a batch of one: pass image[0] (one image at a time).")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(
            f"{name} must be [H, W, 3] (or [H, W] / [H, W, 1] grayscale, [H, W, 4] with alpha), got shape {shape}."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {shape}): it has no pixels.")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            raise ValueError(
                f"{name} has dtype {image.dtype}; RegionSpot takes [H, W, 3] uint8 images (0..255), and "
                f"{_float_fix(image)}."
            )
        if image.dtype == np.uint16:
            raise ValueError(
                f"{name} is 16-bit (uint16, values up to {int(image.max())}); RegionSpot takes [H, W, 3] uint8 "
                "images (SAM and CLIP read 8 bits), and the scale depends on the bits your data uses: "
                "(image / 257).round().astype(np.uint8) for full-range 16-bit data, (image / 16.06).round()"
                ".astype(np.uint8) for 12-bit data (0..4095). A 16-bit PNG/TIFF file is full-range by its format: "
                "regionspot.data.images.read_image(path) reads it as 8 bits (value >> 8)."
            )
        if image.dtype == np.bool_:
            raise ValueError(
                f"{name} has dtype bool (a mask?); RegionSpot takes [H, W, 3] uint8 images, e.g. "
                "image.astype(np.uint8) * 255 for a binary image."
            )
        fix = ""
        if np.issubdtype(image.dtype, np.integer) and image.size and image.min() >= 0 and image.max() <= 255:
            fix = " Its values lie in 0..255: pass image.astype(np.uint8)."
        raise ValueError(f"{name} has dtype {image.dtype}; RegionSpot takes [H, W, 3] uint8 images (0..255).{fix}")

    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels in (2, 4):
        _log_once("alpha", f"{name}: alpha channel dropped (not composited), as PIL's convert('RGB') does.")
        image = image[:, :, : channels - 1]
    if image.shape[2] == 1:
        _log_once("gray", f"{name}: grayscale image converted to RGB (the channel repeated three times).")
        image = np.repeat(image, 3, axis=2)
    elif image_format == "BGR":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------------------------
# Text embeddings given with a vocabulary
def check_text_embeddings(embeddings, num_classes: int, dim: int, name: str = "embeddings") -> torch.Tensor:
    """
    Check text embeddings given with a vocabulary: [C, D] for C class names and CLIP's text width
    D, finite, each row L2-normalised (the logits are ``logit_scale`` x cosine only then).

    Args:
        embeddings: the tensor.
        num_classes: C.
        dim: D, CLIP's text embedding width.
        name: how the input is called in messages.

    Returns:
        ``embeddings`` as a float32 tensor.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [C, D], got {type(embeddings).__name__}.")
    if tuple(embeddings.shape) != (num_classes, dim):
        raise ValueError(
            f"Text embeddings of shape {list(embeddings.shape)} do not fit {num_classes} class names and CLIP "
            f"text width {dim}."
        )
    e = embeddings.detach().float()
    finite = torch.isfinite(e).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{name} rows {rows[:_MAX_LISTED]} are not finite; they would make those classes' logits NaN.")
    norms = e.norm(dim=1)
    off = (norms - 1).abs() > _NORM_TOLERANCE
    if bool(off.any()):
        rows = off.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} rows {rows[:_MAX_LISTED]} are not L2-normalised (norms {_listing(rows, norms[rows].tolist())}); "
            "the logits are logit_scale x cosine only for unit rows: pass embeddings / embeddings.norm(dim=1, "
            "keepdim=True)."
        )
    return e
