"""
Which localizer and vision-language model a RegionSpot head holds, as checkpoints record it
(``frozen_pair``), and the refusal of fusion weights trained with another pair. Imports nothing of
RegionSpot, so the weight-file code can use it.
"""
from typing import Dict, Optional

import torch

__all__ = ["RELEASED_PAIR", "frozen_pair", "describe_pair", "find_regionspot_head", "frozen_pair_mismatch"]

# What a checkpoint without a record was trained with: the only pair there was before the registries.
RELEASED_PAIR = {"localizer": "SamRegionTokens", "vlm": "ClipDenseFeatures"}


def frozen_pair(head) -> Dict[str, str]:
    """Which localizer and VLM (class and model) a head holds: what checkpoints record."""
    return {
        "localizer": type(head.sam).__name__,
        "localizer_model": str(getattr(head.sam, "model_name", "") or ""),
        "vlm": type(head.clip).__name__,
        "vlm_model": str(getattr(head.clip, "model_name", "") or ""),
    }


def describe_pair(pair: Dict[str, str]) -> str:
    def one(kind):
        model = pair.get(kind + "_model")
        return f"{pair[kind]} ({model})" if model else pair[kind]

    return f"localizer {one('localizer')} + VLM {one('vlm')}"


def find_regionspot_head(model):
    """The module holding the ``sam``, ``clip`` and ``fusion`` slots (a RegionSpot head), or None."""
    for module in model.modules():
        if all(isinstance(getattr(module, a, None), torch.nn.Module) for a in ("sam", "clip", "fusion")):
            return module
    return None


def frozen_pair_mismatch(model, recorded: Optional[Dict[str, str]], path: str, key: str) -> Optional[str]:
    """
    The message refusing fusion weights trained with another localizer or VLM than ``model``'s, or None.

    Args:
        model: the model (or head) the weights go into; one without a RegionSpot head passes.
        recorded: the file's ``frozen_pair`` entry; None for files written before it existed (the
            authors' released checkpoints and ours), which were trained with :data:`RELEASED_PAIR`.
        path, key: the file and the config key that named it, for the message.

    The class names are compared, and the models within the family when both sides record them.
    """
    head = find_regionspot_head(model)
    if head is None:
        return None
    have = frozen_pair(head)
    rec = dict(recorded) if isinstance(recorded, dict) and recorded.get("localizer") else dict(RELEASED_PAIR)
    differs = any(rec.get(kind) != have[kind] for kind in ("localizer", "vlm"))
    for kind in ("localizer_model", "vlm_model"):
        if rec.get(kind) and have.get(kind) and rec[kind] != have[kind]:
            differs = True
    if not differs:
        return None
    how = "" if recorded else " (the file records no pair: a released checkpoint or one written before pairs were recorded)"
    return (
        f"{key}={path!r} holds fusion weights trained with {describe_pair(rec)}{how}, but this config builds "
        f"{describe_pair(have)}: the fusion module would read tokens and features it was never trained on. Set "
        "MODEL.REGIONSPOT.LOCALIZER.NAME / TYPE and VLM.NAME / TYPE (SAM.TYPE / CLIP.TYPE for the released pair) to "
        "the checkpoint's pair, or give a checkpoint trained with this pair."
    )

