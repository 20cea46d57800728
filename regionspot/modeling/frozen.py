"""Shared behaviour of the frozen foundation models (SAM and CLIP)."""
import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class FrozenModule(nn.Module):
    """
    A module whose parameters never train: ``requires_grad`` is off and it stays in eval mode
    even when a trainer calls ``model.train()`` on the model that holds it. Its forwards run under
    autocast when :attr:`precision` is "fp16" or "bf16" (weights stay fp32; outputs are fp32).
    """

    precision = "fp32"

    def set_precision(self, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(
                f"MODEL.REGIONSPOT.FROZEN_PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}."
            )
        self.precision = precision
        return self

    def autocast(self):
        """Autocast context for the frozen forwards, on the module's device type."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        device_type = next(self.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=PRECISIONS[self.precision])

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True):
        # Frozen models keep eval-mode behaviour (dropout off) whatever the trainer asks.
        return super().train(False)
