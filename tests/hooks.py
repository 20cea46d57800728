"""Trainer hooks shared by the training tests."""
from detectron2.engine import HookBase


class RecordLoss(HookBase):
    """Appends the total loss of every step to ``out``."""

    def __init__(self, out):
        self.out = out

    def after_step(self):
        self.out.append(self.trainer.storage.history("total_loss").latest())
