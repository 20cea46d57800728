"""Shared behaviour of the frozen foundation models (SAM and CLIP)."""
import contextlib
import copy
import functools
from typing import Dict

import torch
from torch import nn


@contextlib.contextmanager
def seeded(seed: int):
    """
    Run a block with torch's CPU generator seeded, restoring the caller's RNG state after. Only the
    CPU generator is touched (``torch.manual_seed`` would also re-seed every CUDA generator, and
    those are not restored): the frozen models are built on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=None)
def _cuda_bf16_supported(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


class FrozenModule(nn.Module):
    """
    A module whose parameters never train: ``requires_grad`` is off and it stays in eval mode
    even when a trainer calls ``model.train()`` on the model that holds it.

    Precision (:meth:`set_precision`): "fp32" runs the stock fp32 weights. "bf16" runs the heavy
    parts named by :attr:`bf16_parts` from bf16 copies of their weights, made once (activations
    stay bf16 from block to block, with no per-operation casts and no per-forward weight casts, as
    autocast would do); the fp32 modules are kept unchanged, so weight fingerprints, the text tower
    and anything else that reads them (SAM's automatic mask generator, the stock text forward) see
    fp32. "fp16" runs the forwards under autocast. Outputs are fp32 in every case.
    """

    precision = "fp32"
    # Attribute paths (from this module) of the sub-modules run from bf16 copies under "bf16".
    bf16_parts = ()
    # Module types inside those copies that keep fp32 weights (e.g. CLIP's LayerNorm, which
    # normalises in fp32 whatever its input).
    bf16_keep_fp32 = ()

    def set_precision(self, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(
                f"MODEL.REGIONSPOT.FROZEN.PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}."
            )
        self.precision = precision
        copies = nn.ModuleDict()
        if precision == "bf16":
            for path in self.bf16_parts:
                original = functools.reduce(getattr, path.split("."), self)
                # The memo keeps references to this module (e.g. forward hooks bound to it) pointing
                # at it instead of copying it along.
                twin = copy.deepcopy(original, memo={id(self): self}).to(torch.bfloat16)
                for m in twin.modules():
                    if isinstance(m, tuple(self.bf16_keep_fp32)):
                        m.float()
                copies[path.replace(".", "__")] = twin.requires_grad_(False).eval()
        # A registered child, so the copies follow .to(device); kept out of the fp32 modules.
        self.bf16_copies = copies
        return self

    def part(self, path: str) -> nn.Module:
        """The sub-module at ``path`` to run: its bf16 copy under "bf16", else the module itself."""
        copies: Dict[str, nn.Module] = getattr(self, "bf16_copies", {})
        key = path.replace(".", "__")
        if key in copies:
            return copies[key]
        return functools.reduce(getattr, path.split("."), self)

    def autocast(self):
        """
        Autocast context for the frozen forwards, on the module's device type. "fp32" turns autocast
        off, so the frozen models stay in fp32 inside an enclosing autocast region too (detectron2's
        AMPTrainer with ``SOLVER.AMP.ENABLED``, which then applies to the trained module only).
        """
        device = next(self.parameters()).device
        if self.precision == "bf16" and device.type == "cuda" and not _cuda_bf16_supported(device):
            raise RuntimeError(
                f"MODEL.REGIONSPOT.FROZEN.PRECISION='bf16' but {torch.cuda.get_device_name(device)} has no bf16 "
                "support: use 'fp16' (or 'fp32')."
            )
        if self.precision == "fp16":
            return torch.autocast(device_type=device.type, dtype=torch.float16)
        # fp32, and bf16 (which runs bf16 weights natively): no autocast, also inside an enclosing one.
        return torch.autocast(device_type=device.type, enabled=False)

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True):
        # Frozen models keep eval-mode behaviour (dropout off) whatever the trainer asks.
        return super().train(False)


def keep_out_of_checkpoints(module: nn.Module, *children: str) -> nn.Module:
    """
    Leave the named child modules (frozen models that come from their own weight files) out of
    ``module.state_dict()``, and do not report their parameters as missing when loading.

    Args:
        module: the module holding them.
        children: attribute names of the children, e.g. ``"sam", "clip"``.
    """
    names = tuple(c + "." for c in children)

    def drop(mod, state_dict, prefix, local_metadata):
        skip = tuple(prefix + n for n in names)
        for k in [k for k in state_dict if k.startswith(skip)]:
            del state_dict[k]

    def remember_prefix(mod, state_dict, prefix, *args):
        mod._load_prefix = prefix  # the post-hook is not told the prefix

    def quiet(mod, incompatible_keys):
        skip = tuple(getattr(mod, "_load_prefix", "") + n for n in names)
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(skip)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(remember_prefix)
    module.register_load_state_dict_post_hook(quiet)
    return module
