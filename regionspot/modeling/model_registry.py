"""
The two frozen slots of the head and the registries that fill them.

A **localizer** (the head's ``sam`` slot) turns an image into a per-image state and region prompts
(boxes, points) into position-aware tokens, low-resolution mask logits and mask scores:

* ``encode_image(image) -> state`` / ``encode_images(images) -> [state]``: the state has
  ``original_size`` (H, W) and ``input_size`` (what the mask up-sampling needs);
* ``decode_prompts(state, boxes, points, point_labels, with_masks, chunk_size)`` -> an object with
  ``tokens`` [N, D_tok], ``low_res_masks`` [N, 1, h, w] or None, ``mask_scores`` [N] (and, for
  :class:`LocalizerOutput`, ``object_scores`` [N] logits or None);
* ``token_dim``; ``mask_postprocessor``: an object with ``postprocess_masks(low_res, input_size,
  output_size)`` and ``mask_threshold`` (given to :class:`~regionspot.modeling.masks.SamMasks`);
* ``sam``: the wrapped frozen model (fingerprints of the feature cache hash its state dict).

A **vision-language model** (the head's ``clip`` slot) gives the dense feature map and text embeddings:

* ``image_to_tensor``, ``preprocess``, ``dense_features(images, preprocessed) -> [B, L, D_v]``;
* ``tokenize(sentences) -> [K, n]`` token ids and ``encode_text(tokens, stock=False) -> [K, D_t]``;
* ``width`` (D_v), ``embed_dim`` (D_t), ``logit_scale``, ``num_tokens`` (L), ``input_size``;
* ``model``: the wrapped frozen model (text-embedding cache and feature-cache fingerprints).

Both are :class:`~regionspot.modeling.frozen.FrozenModule` s (eval mode, no autograd,
``set_precision``). ``MODEL.REGIONSPOT.LOCALIZER.NAME`` and ``MODEL.REGIONSPOT.VLM.NAME`` pick the
registered class; each class is built by its ``from_regionspot_config(cfg)`` (the released adapters,
:class:`SamRegionTokens` and :class:`ClipDenseFeatures`, by the builders below, from ``SAM.*`` and
``CLIP.*`` as before). ``model_name`` of a built adapter says which model of its family it holds; it
is recorded in checkpoints with the class name (:func:`frozen_pair`).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from detectron2.utils.registry import Registry

from .clip_features import ClipDenseFeatures, build_clip
from .pairs import RELEASED_PAIR, describe_pair, find_regionspot_head, frozen_pair, frozen_pair_mismatch  # noqa: F401
from .sam_tokens import SamPromptOutput, SamRegionTokens, build_sam
from .weights import WeightsFileError

__all__ = [
    "LOCALIZER_REGISTRY",
    "VLM_REGISTRY",
    "LocalizerOutput",
    "build_localizer",
    "build_vlm",
    "frozen_pair",
    "describe_pair",
    "RELEASED_PAIR",
    "check_frozen_pair",
    "find_regionspot_head",
]

LOCALIZER_REGISTRY = Registry("REGIONSPOT_LOCALIZER")
LOCALIZER_REGISTRY.__doc__ = "Frozen localizers (prompts -> region tokens, masks): MODEL.REGIONSPOT.LOCALIZER.NAME."
VLM_REGISTRY = Registry("REGIONSPOT_VLM")
VLM_REGISTRY.__doc__ = "Frozen vision-language models (image -> dense map; text -> embeddings): MODEL.REGIONSPOT.VLM.NAME."



@dataclass
class LocalizerOutput(SamPromptOutput):
    """:class:`SamPromptOutput` plus the localizer's per-prompt object-score logits, if it has them."""

    object_scores: Optional[torch.Tensor] = None  # [N] logits (SAM 2's "is there an object")


def _build_sam_adapter(cfg) -> SamRegionTokens:
    rs = cfg.MODEL.REGIONSPOT
    adapter = SamRegionTokens(
        build_sam(rs.SAM.TYPE, rs.SAM.WEIGHTS, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED), fast=rs.SAM.FAST_PATH
    )
    adapter.model_name = rs.SAM.TYPE
    return adapter


def _build_clip_adapter(cfg) -> ClipDenseFeatures:
    rs = cfg.MODEL.REGIONSPOT
    adapter = ClipDenseFeatures(
        build_clip(rs.CLIP.TYPE, rs.CLIP.WEIGHTS, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED + 1),
        rs.CLIP.INPUT_SIZE,
        antialias=rs.CLIP.RESIZE_ANTIALIAS,
    )
    adapter.model_name = rs.CLIP.TYPE
    return adapter


LOCALIZER_REGISTRY.register(SamRegionTokens)
VLM_REGISTRY.register(ClipDenseFeatures)
_STOCK_BUILDERS = {SamRegionTokens: _build_sam_adapter, ClipDenseFeatures: _build_clip_adapter}


def _build(registry: Registry, key: str, name: str, cfg):
    try:
        cls = registry.get(name)
    except KeyError:
        names = ", ".join(sorted(n for n, _ in registry))
        raise ValueError(f"{key}={name!r} is not registered; use one of {names}.") from None
    builder = _STOCK_BUILDERS.get(cls) or getattr(cls, "from_regionspot_config", None)
    if builder is None:
        raise ValueError(f"{key}={name!r}: {cls.__name__} has no from_regionspot_config(cfg) to build it.")
    adapter = builder(cfg)
    if not getattr(adapter, "model_name", None):
        adapter.model_name = ""
    return adapter.set_precision(cfg.MODEL.REGIONSPOT.FROZEN.PRECISION)


def build_localizer(cfg):
    """The frozen localizer of ``MODEL.REGIONSPOT.LOCALIZER.NAME`` (CPU, fp32 weights, eval)."""
    return _build(LOCALIZER_REGISTRY, "MODEL.REGIONSPOT.LOCALIZER.NAME", cfg.MODEL.REGIONSPOT.LOCALIZER.NAME, cfg)


def build_vlm(cfg):
    """The frozen vision-language model of ``MODEL.REGIONSPOT.VLM.NAME`` (CPU, fp32 weights, eval)."""
    return _build(VLM_REGISTRY, "MODEL.REGIONSPOT.VLM.NAME", cfg.MODEL.REGIONSPOT.VLM.NAME, cfg)


def check_frozen_pair(model, recorded: Optional[Dict[str, str]], path: str, key: str) -> None:
    """
    Refuse fusion weights trained with another localizer or vision-language model than the model's
    (see :func:`regionspot.modeling.pairs.frozen_pair_mismatch`; files without a record were trained
    with :data:`RELEASED_PAIR`).

    Raises:
        regionspot.modeling.weights.WeightsFileError: the pairs differ; the message names both.
    """
    message = frozen_pair_mismatch(model, recorded, path, key)
    if message:
        raise WeightsFileError(message, path, key)
