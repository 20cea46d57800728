"""
RegionSpot ("Recognize Any Regions") as a detectron2 extension.

``import regionspot`` registers the ``RegionSpot`` meta-architecture, the ``RegionSpotROIHeads``
head and the built-in datasets.
"""
try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RegionSpot needs detectron2, which is not installed. Install it from source "
        "(https://github.com/facebookresearch/detectron2) or run `make install` in this repository, "
        "which installs a build of detectron2 only when none is present."
    ) from e

from . import data  # registers datasets
from . import modeling  # registers the meta-architecture and ROI head
from .checkpoint import RegionSpotCheckpointer, convert_regionspot_state_dict
from .config import add_regionspot_config
from .predictor import RegionSpotPredictor

__version__ = "0.1.0"

__all__ = [
    "add_regionspot_config",
    "RegionSpotCheckpointer",
    "convert_regionspot_state_dict",
    "RegionSpotPredictor",
]
