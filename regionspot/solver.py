"""Optimizer of the fusion module (AdamW with whole-model gradient clipping, as the authors)."""
import itertools

import torch

from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_regionspot_optimizer"]


def _with_full_model_clipping(optimizer_cls, max_norm: float, norm_type: float):
    """Subclass of ``optimizer_cls`` clipping the L2 norm of all gradients together before a step."""

    class FullModelClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipping.__name__ = optimizer_cls.__name__ + "WithFullModelGradientClip"
    return FullModelClipping


def build_regionspot_optimizer(cfg, model) -> torch.optim.Optimizer:
    """
    ``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD") over the trainable parameters only (frozen SAM/CLIP
    have ``requires_grad=False``). ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` may be detectron2's
    "value"/"norm" (per parameter) or "full_model" (one norm over all gradients, the authors').
    """
    params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=0.0)
    name = cfg.SOLVER.OPTIMIZER
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"lr": cfg.SOLVER.BASE_LR, "momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={name!r}: use 'ADAMW' or 'SGD'.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer_cls(params, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_cls(params, **kwargs))
