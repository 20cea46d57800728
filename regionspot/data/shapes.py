"""
A small, procedurally generated detection dataset of coloured shapes.

It backs the built-in quickstart: it needs no download, is generated deterministically from a
seed on first use, and each class is a fixed (shape, colour) pair, so a model can actually learn
it. Images are written as PNG files under ``<root>/<split>/`` together with an
``annotations.json`` manifest holding the Detectron2 dataset dicts; later calls with the same
arguments load the manifest instead of regenerating anything.

Polygon vertices lie on pixel centres (integer pixel index + 0.5), so a polygon and the pixels
that :func:`cv2.fillPoly` paints for it cover the same region, and a box (the polygon's extents)
always lies inside the image.
"""
import copy
import functools
import json
import logging
import os

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .atomic_files import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "SHAPES_SPLITS",
    "generate_shapes_split",
    "register_shapes_datasets",
]

# Class names; class i is always drawn with shape/colour i below.
SHAPES_CLASSES = [
    "red circle",
    "green square",
    "blue triangle",
    "yellow star",
    "magenta ellipse",
    "cyan diamond",
]
# Nominal RGB colour of each class (also used as detectron2's ``thing_colors``).
SHAPES_COLORS = [
    (220, 30, 30),
    (30, 200, 60),
    (40, 70, 230),
    (235, 220, 30),
    (220, 40, 220),
    (30, 215, 225),
]
_SHAPE_KINDS = ["circle", "square", "triangle", "star", "ellipse", "diamond"]

# Registered splits: split -> (number of images, seed).
SHAPES_SPLITS = {
    "train": (300, 0),
    "val": (60, 1),
}

# Bump whenever the drawing code changes, so that stale files on disk are regenerated.
GENERATOR_VERSION = 1
IMAGE_WIDTH = 160
IMAGE_HEIGHT = 128
MIN_SHAPE_SIZE = 18
MAX_SHAPE_SIZE = 60
MAX_SHAPES_PER_IMAGE = 5
MANIFEST_NAME = "annotations.json"

_COLOR_JITTER = 12  # per channel, around the nominal class colour
_NOISE_SIGMA = 4.0  # gaussian pixel noise over the whole image
_BOX_MARGIN = 2  # minimum gap in pixels between the boxes of two shapes
_PLACEMENT_TRIES = 50


def _rotate(points, degrees):
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return points @ rot.T


def _regular_points(n, radius_x, radius_y, start_degrees=0.0):
    angles = np.deg2rad(start_degrees) + np.arange(n) * (2 * np.pi / n)
    return np.stack([radius_x * np.cos(angles), radius_y * np.sin(angles)], axis=1)


def _shape_outline(kind, size, rng):
    """
    Float polygon (N, 2) of one shape centred on the origin, ``size`` pixels across (nominal).
    """
    r = size / 2.0
    if kind == "circle":
        return _regular_points(32, r, r)
    if kind == "square":
        corners = np.array([[-r, -r], [r, -r], [r, r], [-r, r]])
        return _rotate(corners, rng.uniform(-15, 15))
    if kind == "triangle":
        # Equilateral, pointing up (image y grows downwards).
        return _rotate(_regular_points(3, r, r, start_degrees=-90), rng.uniform(-20, 20))
    if kind == "star":
        outer = _regular_points(5, r, r, start_degrees=-90)
        inner = _regular_points(5, 0.45 * r, 0.45 * r, start_degrees=-90 + 36)
        star = np.empty((10, 2))
        star[0::2] = outer
        star[1::2] = inner
        return _rotate(star, rng.uniform(-36, 36))
    if kind == "ellipse":
        ellipse = _regular_points(36, r, r * rng.uniform(0.45, 0.7))
        return _rotate(ellipse, rng.uniform(-30, 30))
    if kind == "diamond":
        half_w = r * rng.uniform(0.55, 0.75)
        rhombus = np.array([[0, -r], [half_w, 0], [0, r], [-half_w, 0]])
        return _rotate(rhombus, rng.uniform(-10, 10))
    raise ValueError(f"Unknown shape kind {kind!r}")


def _background(rng, height, width):
    # Low-saturation linear gradient between two random greys, so all class colours stand out.
    def grey():
        return rng.uniform(70, 170) + rng.uniform(-15, 15, size=3)

    c0, c1 = grey(), grey()
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    proj = xs * np.cos(angle) + ys * np.sin(angle)
    t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-6)
    return c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]


def _polygon_area(points):
    x, y = points[:, 0], points[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _boxes_overlap(a, b, margin):
    return not (
        a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1]
    )


def _render_image(rng, height=IMAGE_HEIGHT, width=IMAGE_WIDTH):
    """
    Draw one image.

    Returns:
        tuple: (uint8 RGB array of shape (H, W, 3), list of annotation dicts whose ``bbox_mode``
        is stored as a plain int so they can go to JSON unchanged).
    """
    canvas = _background(rng, height, width)
    placed = []  # XYXY integer pixel boxes (inclusive) of the shapes drawn so far
    annotations = []
    num_shapes = int(rng.integers(1, MAX_SHAPES_PER_IMAGE + 1))
    for _ in range(num_shapes):
        category_id = int(rng.integers(len(SHAPES_CLASSES)))
        size = rng.uniform(MIN_SHAPE_SIZE, MAX_SHAPE_SIZE)
        outline = np.round(_shape_outline(_SHAPE_KINDS[category_id], size, rng)).astype(np.int64)
        lo, hi = outline.min(axis=0), outline.max(axis=0)
        # Integer offsets that keep every vertex inside [0, W-1] x [0, H-1].
        lo_off, hi_off = -lo, np.array([width - 1, height - 1]) - hi
        if np.any(hi_off < lo_off):
            continue
        for _try in range(_PLACEMENT_TRIES):
            offset = np.array(
                [rng.integers(lo_off[0], hi_off[0] + 1), rng.integers(lo_off[1], hi_off[1] + 1)]
            )
            box = np.concatenate([lo + offset, hi + offset])
            if not any(_boxes_overlap(box, other, _BOX_MARGIN) for other in placed):
                break
        else:
            continue  # no free spot: draw fewer shapes
        placed.append(box)
        pixels = outline + offset
        color = np.clip(
            np.array(SHAPES_COLORS[category_id]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3),
            0,
            255,
        )
        cv2.fillPoly(canvas, [pixels.astype(np.int32)], color.astype(np.float64).tolist())

        polygon = pixels.astype(np.float64) + 0.5  # vertices on pixel centres
        x0, y0 = polygon.min(axis=0)
        x1, y1 = polygon.max(axis=0)
        annotations.append(
            {
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "bbox_mode": int(BoxMode.XYWH_ABS),
                "category_id": category_id,
                "segmentation": [polygon.reshape(-1).tolist()],
                "iscrowd": 0,
                "area": _polygon_area(polygon),
            }
        )
    canvas = canvas + rng.normal(0.0, _NOISE_SIGMA, size=canvas.shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, annotations


def _manifest_header(split, num_images, seed):
    return {
        "generator": "regionspot_shapes",
        "version": GENERATOR_VERSION,
        "split": split,
        "seed": int(seed),
        "num_images": int(num_images),
        "width": IMAGE_WIDTH,
        "height": IMAGE_HEIGHT,
        "classes": list(SHAPES_CLASSES),
    }


def _load_manifest(split_dir, header):
    """Return the manifest in ``split_dir`` if it matches ``header`` and is complete, else None."""
    path = os.path.join(split_dir, MANIFEST_NAME)
    try:
        with open(path, "r") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in header.items()):
        return None
    images = manifest.get("images")
    if not isinstance(images, list) or len(images) != header["num_images"]:
        return None
    if not all(os.path.isfile(os.path.join(split_dir, im["file_name"])) for im in images):
        return None
    return manifest


def _dicts_from_manifest(manifest, split_dir):
    dicts = []
    for im in manifest["images"]:
        record = copy.deepcopy(im)
        record["file_name"] = os.path.join(split_dir, im["file_name"])
        for ann in record["annotations"]:
            ann["bbox_mode"] = BoxMode(ann["bbox_mode"])
        dicts.append(record)
    return dicts


def generate_shapes_split(root, split, num_images, seed):
    """
    Generate (or load, if already generated) one split of the shapes dataset.

    Images go to ``<root>/<split>/<image_id:06d>.png`` and the dataset dicts to
    ``<root>/<split>/annotations.json``, which also records the generator version, seed and
    number of images. When a matching manifest and all its images exist, they are loaded and
    nothing is written. Otherwise the split is regenerated; every file is written to a temporary
    file and moved into place with :func:`os.replace`, and the manifest is removed first and
    written last, so an interrupted run is never taken for a complete one.

    Image ``i`` depends only on ``(seed, i)``, so the output is fully deterministic.

    Args:
        root (str): dataset root directory.
        split (str): split name, used as the sub-directory name.
        num_images (int): number of images in the split.
        seed (int): random seed of the split.

    Returns:
        list[dict]: Detectron2 dataset dicts with ``file_name`` (absolute path), ``image_id``,
        ``height``, ``width`` and ``annotations`` (``bbox`` in ``BoxMode.XYWH_ABS``,
        contiguous ``category_id`` in ``[0, len(SHAPES_CLASSES))``, polygon ``segmentation``,
        ``iscrowd`` and ``area``).
    """
    split_dir = os.path.abspath(os.path.join(os.path.expanduser(root), split))
    header = _manifest_header(split, num_images, seed)
    manifest = _load_manifest(split_dir, header)
    if manifest is not None:
        logger.debug("Loaded %d shapes images of split '%s' from %s", num_images, split, split_dir)
        return _dicts_from_manifest(manifest, split_dir)

    logger.info(
        "Generating %d shapes images of split '%s' (seed %d) in %s", num_images, split, seed, split_dir
    )
    os.makedirs(split_dir, exist_ok=True)
    manifest_path = os.path.join(split_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the images are about to change under it

    images = []
    for image_id in range(int(num_images)):
        rng = np.random.default_rng([int(seed), image_id])
        image, annotations = _render_image(rng)
        file_name = f"{image_id:06d}.png"
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"Could not encode shapes image {file_name}")
        atomic_write_bytes(os.path.join(split_dir, file_name), encoded.tobytes())
        images.append(
            {
                "file_name": file_name,  # relative to the split directory in the manifest
                "image_id": image_id,
                "height": IMAGE_HEIGHT,
                "width": IMAGE_WIDTH,
                "annotations": annotations,
            }
        )
    manifest = dict(header, images=images)
    atomic_write_bytes(manifest_path, json.dumps(manifest).encode("utf-8"))
    return _dicts_from_manifest(manifest, split_dir)


def _default_root():
    datasets = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(datasets, "regionspot_shapes")


def register_shapes_datasets(root=None, prefix="regionspot_shapes"):
    """
    Register ``<prefix>_train`` (300 images, seed 0) and ``<prefix>_val`` (60 images, seed 1)
    in detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.

    Registration is lazy: images are generated (or loaded) only when ``DatasetCatalog.get`` is
    called. Names that are already registered are left untouched, so calling this twice is safe.

    Args:
        root (str or None): where the images are written; default
            ``$DETECTRON2_DATASETS/regionspot_shapes`` (``DETECTRON2_DATASETS`` defaults to
            ``datasets``).
        prefix (str): prefix of the dataset names.

    Returns:
        list[str]: the names of the datasets (registered now or before).
    """
    root = _default_root() if root is None else os.path.expanduser(root)
    names = []
    for split, (num_images, seed) in SHAPES_SPLITS.items():
        name = f"{prefix}_{split}"
        names.append(name)
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(
            name,
            functools.partial(generate_shapes_split, root, split, num_images, seed),
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES),
            thing_colors=[list(c) for c in SHAPES_COLORS],
            evaluator_type="coco",
        )
    return names
