"""
Inputs of the benchmark: the variants' configs with random frozen weights, the image, the random
boxes and the vocabularies.
"""
import logging
import os

logger = logging.getLogger("regionspot.benchmark")

# The checkout this package lives in (configs/ is resolved against it).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANT_CONFIGS = {
    "BB": "configs/Base-RegionSpot-BB.yaml",
    "BL": "configs/Base-RegionSpot-BL.yaml",
    "BL336": "configs/Base-RegionSpot-BL336.yaml",
    "tiny": "configs/Quickstart/RegionSpot-tiny_shapes.yaml",
}
DEFAULT_VOCABULARY = (
    "person", "cup", "coffee", "spoon", "plate", "table", "dog", "car", "chair", "bottle",
)
RANDOM_IMAGE_HW = (512, 600)


def repo_path(*parts: str) -> str:
    """A path inside the checkout (e.g. ``repo_path("configs", "Base-RegionSpot-BB.yaml")``)."""
    return os.path.join(REPO_ROOT, *parts)


def build_cfg(variant: str, device: str, cache_dir: str, vocabulary, fast_path: bool = True, precision: str = "fp32"):
    """The variant's config with seeded random frozen weights, no weight file and a custom vocabulary."""
    from regionspot.config import get_regionspot_cfg

    cfg = get_regionspot_cfg(repo_path(VARIANT_CONFIGS[variant]), [
        "MODEL.DEVICE", device,
        "MODEL.WEIGHTS", "",
        "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT", True,
        # The fusion module is random on purpose (seeded): timing and agreement, not accuracy.
        "MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", True,
        "MODEL.REGIONSPOT.SAM.WEIGHTS", "",
        "MODEL.REGIONSPOT.SAM.FAST_PATH", bool(fast_path),
        "MODEL.REGIONSPOT.FROZEN.PRECISION", precision,
        "MODEL.REGIONSPOT.CLIP.WEIGHTS", "",
        "MODEL.REGIONSPOT.VOCAB.SOURCE", "custom",
        "MODEL.REGIONSPOT.VOCAB.CUSTOM", list(vocabulary),
        "MODEL.REGIONSPOT.VOCAB.CACHE_DIR", cache_dir,
    ])
    cfg.freeze()
    return cfg


def load_image(spec: str, seed: int):
    """
    Args:
        spec: "coffee" or "astronaut" (scikit-image's sample photos), "random", or an image path.
        seed: seed of the random image.

    Returns:
        ([H, W, 3] uint8 RGB array, description string).
    """
    import numpy as np

    if spec in ("coffee", "astronaut"):
        try:
            import skimage.data
        except ImportError:
            logger.warning("scikit-image is not installed; using a seeded random image instead of %r.", spec)
        else:
            return np.ascontiguousarray(getattr(skimage.data, spec)()), f"skimage.data.{spec}()"
        spec = "random"
    if spec == "random":
        rng = np.random.default_rng(seed)
        h, w = RANDOM_IMAGE_HW
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), f"random {w}x{h} (seed {seed})"
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--image {spec!r}: not 'coffee', 'astronaut', 'random' or an existing file.")
    from PIL import Image

    with Image.open(spec) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8)), spec


def random_boxes(num: int, height: int, width: int, seed: int, min_size: float = 8.0):
    """[num, 4] float32 XYXY boxes inside a (height, width) image, at least min_size on each side."""
    import numpy as np

    rng = np.random.default_rng(seed)
    min_w, min_h = min(min_size, width), min(min_size, height)
    x1 = rng.uniform(0, width - min_w, size=num)
    y1 = rng.uniform(0, height - min_h, size=num)
    # x1 <= width - min_w, so every box fits: min_w <= box width <= width - x1.
    x2 = np.minimum(x1 + rng.uniform(min_w, width - x1), width)
    y2 = np.minimum(y1 + rng.uniform(min_h, height - y1), height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(num, 4)


def lvis_vocabulary():
    """The 1203 LVIS v1 class names as detectron2's ``lvis_v1_*`` datasets name them (by category id)."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [c["synonyms"][0] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
