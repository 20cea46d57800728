"""
Training and evaluation of RegionSpot models (detectron2's ``projects/DensePose`` layout: the
package holds the trainer, ``train_net.py`` only launches it), and the code that needs a built
model to serve the data side: training vocabularies and the frozen-model fingerprints of the
feature cache. The feature extractor is :mod:`regionspot.engine.feature_extraction`.
"""
from .distributed import close_process_group, run_then_close
from .fingerprints import (
    build_frozen_head,
    check_feature_cache,
    frozen_fingerprints,
    settings_from_cfg,
    state_dict_sha256,
)
from .trainer import Trainer, build_train_loader, check_amp_device, evaluate_only
from .vocabularies import local_main_process_first, register_training_vocabularies

__all__ = [
    "Trainer",
    "build_frozen_head",
    "build_train_loader",
    "check_amp_device",
    "check_feature_cache",
    "close_process_group",
    "evaluate_only",
    "frozen_fingerprints",
    "local_main_process_first",
    "register_training_vocabularies",
    "run_then_close",
    "settings_from_cfg",
    "state_dict_sha256",
]
