"""
What the frozen models of a config are, for the feature cache (:mod:`regionspot.data.feature_cache`,
which stores and checks these settings but builds no model).

Fingerprints of the frozen weights (chosen so that checking a cache needs no model build when real
weights are used):

* a weights file (``SAM.WEIGHTS`` / ``CLIP.WEIGHTS``): the SHA-256 of the WHOLE file (any change of
  any weight is detected; ~1 s for SAM ViT-B's 360 MB, memoised per (path, size, mtime) within a
  process). The path itself is not compared: moving the file is fine.
* seeded random weights (``FROZEN.RANDOM_INIT`` with empty WEIGHTS, tests and benchmarks only): the
  ``FROZEN.SEED`` and the SHA-256 of the model's state-dict tensors, for which the check builds
  the (random) models once. This also catches a change of the architecture code.

The manifest also stores the SHA-256 of the state-dict tensors of the models the features were made
with, so :func:`check_feature_cache` given a built model compares the very tensors.
"""
import hashlib
from typing import Dict, Iterable, Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..data.feature_cache import FEATURE_DTYPE, FORMAT_NAME, FORMAT_VERSION, FeatureCache, file_sha256, tensor_bytes

__all__ = [
    "build_frozen_head",
    "check_feature_cache",
    "frozen_fingerprints",
    "settings_from_cfg",
    "state_dict_sha256",
]

_RANDOM_FINGERPRINTS: Dict[tuple, dict] = {}


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and values of a module's state dict."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"|{name}|{t.dtype}|{list(t.shape)}|".encode("utf-8"))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _frozen_model_cfg(cfg, device: Optional[str] = None):
    """A copy of ``cfg`` that builds the model without a vocabulary (no text encoding) or proposals."""
    c = cfg.clone()
    c.defrost()
    c.DATASETS.TRAIN = ()
    c.DATASETS.TEST = ()
    c.MODEL.REGIONSPOT.VOCAB.SOURCE = "dataset"
    c.MODEL.REGIONSPOT.BOX_SOURCE = "GT"
    c.MODEL.LOAD_PROPOSALS = False
    c.MODEL.WEIGHTS = ""
    if device is not None:
        c.MODEL.DEVICE = device
    c.freeze()
    return c


def build_frozen_head(cfg, device: Optional[str] = None):
    """
    The ROI head (frozen SAM and CLIP, untrained fusion) of ``build_model(cfg)``, in eval mode,
    built without a vocabulary so no text is encoded.
    """
    model = build_model(_frozen_model_cfg(cfg, device))
    return model.roi_heads.eval()


def _head_of(model):
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "roi_heads", model)


def frozen_fingerprints(model) -> dict:
    """
    Tensor fingerprints and feature dimensions of a built model's (or head's) SAM and CLIP, and the
    precision they run in.
    """
    head = _head_of(model)
    return {
        "frozen_precision": head.sam.precision,
        "sam": {"tensors_sha256": state_dict_sha256(head.sam.sam), "token_dim": int(head.sam.token_dim)},
        "clip": {
            "tensors_sha256": state_dict_sha256(head.clip.model),
            "input_size": int(head.clip.input_size),
            "num_tokens": int(head.clip.num_tokens),
            "width": int(head.clip.width),
        },
    }


def _random_fingerprints(cfg) -> dict:
    rs = cfg.MODEL.REGIONSPOT
    key = (rs.SAM.TYPE, rs.SAM.WEIGHTS, rs.CLIP.TYPE, rs.CLIP.WEIGHTS, rs.CLIP.INPUT_SIZE, rs.FROZEN.SEED,
           rs.LOCALIZER.NAME, rs.LOCALIZER.TYPE, rs.LOCALIZER.WEIGHTS, rs.VLM.NAME, rs.VLM.TYPE, rs.VLM.WEIGHTS)
    if key not in _RANDOM_FINGERPRINTS:
        _RANDOM_FINGERPRINTS[key] = frozen_fingerprints(build_frozen_head(cfg, device="cpu"))
    return _RANDOM_FINGERPRINTS[key]


def settings_from_cfg(cfg, model=None, *, fingerprints: bool = True) -> dict:
    """
    The settings of the feature-cache manifest that follow from ``cfg`` (and from the built
    ``model`` when given: its tensor fingerprints and dimensions; else random-init models are built
    to hash them).

    Args:
        fingerprints: False: only what the config says (types, seeds, CLIP input size, precision),
            without hashing any file or building any model, for a cheap first check.
    """
    rs = cfg.MODEL.REGIONSPOT
    out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if fingerprints:
        out["dtype"] = str(FEATURE_DTYPE).replace("torch.", "")
    for part, weights in (("sam", rs.SAM.WEIGHTS), ("clip", rs.CLIP.WEIGHTS)):
        node = getattr(rs, part.upper())
        out[part] = {"type": node.TYPE, "weights": weights}
        if fingerprints:
            out[part]["weights_sha256"] = file_sha256(weights) if weights else None
        out[part]["random_init_seed"] = None if weights else int(rs.FROZEN.SEED)
    # Another localizer / VLM than the released pair: its class and model are part of the settings.
    for part, node, default in (("sam", rs.LOCALIZER, "SamRegionTokens"), ("clip", rs.VLM, "ClipDenseFeatures")):
        if node.NAME != default:
            out[part].update(
                {"type": f"{node.NAME}:{node.TYPE}", "weights": node.WEIGHTS, "random_init_seed": None if node.WEIGHTS else int(rs.FROZEN.SEED)}
            )
            if fingerprints:
                out[part]["weights_sha256"] = file_sha256(node.WEIGHTS) if node.WEIGHTS else None
    out["clip"]["input_size"] = int(rs.CLIP.INPUT_SIZE)
    out["clip"]["resize_antialias"] = bool(rs.CLIP.RESIZE_ANTIALIAS)
    out["frozen_precision"] = rs.FROZEN.PRECISION
    if not fingerprints:
        return out
    prints = frozen_fingerprints(model) if model is not None else None
    if prints is None and not (out["sam"]["weights"] and out["clip"]["weights"]):
        prints = _random_fingerprints(cfg)
    if prints is not None:
        for part in ("sam", "clip"):
            out[part].update(prints[part])
    return out


def check_feature_cache(cache: FeatureCache, cfg_or_model, datasets: Optional[Iterable[str]] = None) -> None:
    """
    Raise :class:`regionspot.data.feature_cache.StaleFeatureCacheError` unless ``cache`` was made
    with the frozen models of a config (frozen-model types, weights fingerprints, FROZEN.SEED,
    CLIP.INPUT_SIZE: what the config says is compared first, before any file is hashed or model
    built) or of a built model (tensor fingerprints, dimensions), and
    :class:`~regionspot.data.feature_cache.FeatureCacheError` when one of ``datasets`` (default for
    a config: its DATASETS.TRAIN) is not in it.
    """
    if isinstance(cfg_or_model, CfgNode):
        cfg = cfg_or_model
        cache.check(settings_from_cfg(cfg, fingerprints=False), datasets=())
        cache.check(settings_from_cfg(cfg), cfg.DATASETS.TRAIN if datasets is None else datasets)
    else:
        cache.check(frozen_fingerprints(cfg_or_model), datasets)
