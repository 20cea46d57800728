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


class FrozenModule(nn.Module):
    """
    A module whose parameters never train: ``requires_grad`` is off and it stays in eval mode
    even when a trainer calls ``model.train()`` on the model that holds it.
    """

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True):
        # Frozen models keep eval-mode behaviour (dropout off) whatever the trainer asks.
        return super().train(False)
