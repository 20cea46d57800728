"""
Deployment: ONNX graphs of the predictor, a torch-free predictor running them, and stores of
region embeddings to re-score against new vocabularies.

``OnnxRegionSpotPredictor`` (and the tokenizer and pixel steps it uses) imports ONNX Runtime,
numpy and PIL only: on a machine without torch and detectron2, ``from regionspot.export import
OnnxRegionSpotPredictor`` works (``regionspot``'s own ``__init__`` then registers nothing). The
export (:func:`export_model`) and the region store need torch and are imported on first use.
"""
from .onnx_predictor import OnnxRegionSpotPredictor

__all__ = ["OnnxRegionSpotPredictor", "export_model", "RegionStore"]


def __getattr__(name):
    if name == "export_model":
        from .onnx_graphs import export_model

        return export_model
    if name == "RegionStore":
        from .store import RegionStore

        return RegionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
