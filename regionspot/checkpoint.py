"""
Checkpoint layouts: the authors' released RegionSpot checkpoints and ours.

Released checkpoints keep the trainable module under ``model.{to_clip,decoder,projector}.*`` and,
in full training checkpoints, the frozen weights under ``model.sam.*`` / ``model.clip_model.*``.
Our models keep the module in the ROI head as ``roi_heads.fusion.*`` and never store SAM or CLIP
(they come from their own files). :func:`convert_regionspot_state_dict` maps the former to the
latter and checks every shape against the configured model, so a checkpoint of another variant
fails with a message that names both.
"""
import logging
import os
from typing import Dict, Mapping, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["convert_regionspot_state_dict", "RegionSpotCheckpointer", "FUSION_PREFIXES", "accept_released_checkpoints"]

FUSION_PREFIXES = ("to_clip.", "decoder.", "projector.")
_RELEASED_FROZEN = ("model.sam.", "model.clip_model.")


def _describe(shapes: Mapping[str, torch.Size], prefix: str) -> str:
    to_clip = shapes.get(prefix + "to_clip.weight")
    proj = shapes.get(prefix + "projector.weight")
    if to_clip is None or proj is None:
        return "an unknown variant"
    variants = {(768, 512): "RegionSpot-BB (CLIP ViT-B/16)", (1024, 768): "RegionSpot-BL (CLIP ViT-L/14)"}
    dims = (int(to_clip[0]), int(proj[0]))
    name = variants.get(dims, "a custom variant")
    return f"{name}: CLIP width {dims[0]}, text width {dims[1]}, SAM token width {int(to_clip[1])}"


def convert_regionspot_state_dict(
    state_dict: Dict[str, torch.Tensor],
    model_shapes: Mapping[str, torch.Size],
    fusion_prefix: str = "roi_heads.fusion.",
) -> Dict[str, torch.Tensor]:
    """
    Map a released RegionSpot state dict to our key layout and validate it.

    Args:
        state_dict: a checkpoint's ``model`` dict, in the released layout or ours; changed in place.
        model_shapes: parameter name -> shape of the model being loaded.
        fusion_prefix: where the model keeps its :class:`RegionSpotFusion`.

    Returns:
        ``state_dict`` with ``model.to_clip.*`` etc. renamed to ``<fusion_prefix>to_clip.*`` and the
        released frozen SAM / CLIP keys removed.

    Raises:
        ValueError: a fusion-module tensor has a shape other than the model's (another variant).
    """
    frozen = [k for k in state_dict if k.startswith(_RELEASED_FROZEN)]
    for k in frozen:
        del state_dict[k]
    if frozen:
        logger.info(
            f"Ignoring {len(frozen)} frozen SAM/CLIP tensors of the checkpoint; they are read from "
            "MODEL.REGIONSPOT.SAM.WEIGHTS and MODEL.REGIONSPOT.CLIP.WEIGHTS."
        )
    renamed = 0
    for k in list(state_dict):
        if k.startswith("model.") and k[len("model."):].startswith(FUSION_PREFIXES):
            state_dict[fusion_prefix + k[len("model."):]] = state_dict.pop(k)
            renamed += 1
    if renamed:
        logger.info(f"Converted {renamed} tensors of a released RegionSpot checkpoint to '{fusion_prefix}*'.")

    bad = [
        (k, tuple(v.shape), tuple(model_shapes[k]))
        for k, v in state_dict.items()
        if k.startswith(fusion_prefix) and k in model_shapes and tuple(v.shape) != tuple(model_shapes[k])
    ]
    if bad:
        ckpt_shapes = {k: v.shape for k, v in state_dict.items()}
        k, got, want = bad[0]
        raise ValueError(
            f"The checkpoint does not fit the configured model: {k} is {list(got)} in the checkpoint "
            f"but {list(want)} in the model ({len(bad)} tensors differ). The checkpoint is "
            f"{_describe(ckpt_shapes, fusion_prefix)}; the config builds "
            f"{_describe(model_shapes, fusion_prefix)}. Set MODEL.REGIONSPOT.CLIP.TYPE (and "
            "CLIP.INPUT_SIZE) to the variant the checkpoint was trained for, or use the config of "
            "that variant."
        )
    return state_dict


class RegionSpotCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` that also reads the released RegionSpot layout and refuses
    checkpoints of another variant (the stock one would skip mismatched tensors with a warning).
    """

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"Checkpoint not found: {path!r} (MODEL.WEIGHTS). Give the path of a RegionSpot "
                "checkpoint (the authors' release or one written by train_net.py), or leave "
                "MODEL.WEIGHTS empty to start from scratch."
            )
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        fusion_prefix = _find_fusion_prefix(self.model)
        if fusion_prefix is not None:
            model_shapes = {k: v.shape for k, v in self.model.state_dict().items()}
            convert_regionspot_state_dict(checkpoint["model"], model_shapes, fusion_prefix)
        return super()._load_model(checkpoint)


def _find_fusion_prefix(model) -> Optional[str]:
    from .modeling.fusion import RegionSpotFusion

    for name, module in model.named_modules():
        if isinstance(module, RegionSpotFusion):
            return name + "." if name else ""
    return None


def accept_released_checkpoints(model):
    """
    Let ``model.load_state_dict`` (and so the stock ``DetectionCheckpointer``) read released
    RegionSpot checkpoints: keys are converted and validated by :func:`convert_regionspot_state_dict`
    when loading starts. Register on the root module (children only see their own keys).
    """

    def convert(module, state_dict, prefix, *args):
        fusion_prefix = _find_fusion_prefix(module)
        if fusion_prefix is None:
            return
        before = set(state_dict)
        shapes = {prefix + k: v.shape for k, v in module.state_dict().items()}
        convert_regionspot_state_dict(state_dict, shapes, prefix + fusion_prefix)
        module._released_keys_consumed = before - set(state_dict)

    def quiet(module, incompatible_keys):
        consumed = getattr(module, "_released_keys_consumed", set())
        incompatible_keys.unexpected_keys[:] = [k for k in incompatible_keys.unexpected_keys if k not in consumed]

    model.register_load_state_dict_pre_hook(convert)
    model.register_load_state_dict_post_hook(quiet)
    return model
