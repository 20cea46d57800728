"""
RegionSpot ("Recognize Any Regions") as a detectron2 extension.

``import regionspot`` registers the ``RegionSpot`` meta-architecture, the ``RegionSpotROIHeads``
head and the built-in datasets.
"""
__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    # A deployment without torch and detectron2 can still use regionspot.export.OnnxRegionSpotPredictor;
    # everything else says what is missing when first used.
    _MISSING = ImportError(
        "RegionSpot needs detectron2, which is not installed. Install it from source "
        "(https://github.com/facebookresearch/detectron2) or run `make install` in this repository, "
        "which installs a build of detectron2 only when none is present. (Without torch and detectron2, "
        "only regionspot.export.OnnxRegionSpotPredictor is available.)"
    )
    _MISSING.__cause__ = e

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _MISSING
else:
    from . import data  # registers datasets
    from . import modeling  # registers the meta-architecture and ROI head
    from .checkpoint import RegionSpotCheckpointer, convert_regionspot_state_dict
    from .config import add_regionspot_config
    from .predictor import RegionSpotPredictor

__all__ = [
    "add_regionspot_config",
    "RegionSpotCheckpointer",
    "convert_regionspot_state_dict",
    "RegionSpotPredictor",
]
