"""LVIS helpers: the MDETR ``minival`` split and a numpy compatibility fix for ``lvis``."""
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.datasets.lvis import get_lvis_instances_meta, register_lvis_instances

logger = logging.getLogger(__name__)

__all__ = ["LVIS_MINIVAL_NAME", "register_lvis_minival", "patch_lvis_numpy"]

LVIS_MINIVAL_NAME = "lvis_v1_minival"
# Same layout as detectron2's builtin lvis_v1_* splits: (image root, json file) under the root.
# The json file is MDETR's LVIS v1 minival (5k images of LVIS v1 val).
_LVIS_MINIVAL_SPLIT = ("coco/", "lvis/lvis_v1_minival_inserted_image_name.json")


def register_lvis_minival(root=None):
    """
    Register ``lvis_v1_minival`` with detectron2's ``register_lvis_instances`` (LVIS v1
    metadata, ``evaluator_type="lvis"``). Does nothing if the name is already registered.

    Args:
        root (str or None): datasets root; default ``$DETECTRON2_DATASETS`` or ``datasets``.
            The json is ``<root>/lvis/lvis_v1_minival_inserted_image_name.json`` and images are
            found under ``<root>/coco/`` (``train2017/`` or ``val2017/``, from ``coco_url``).

    Returns:
        str: the dataset name.
    """
    if LVIS_MINIVAL_NAME in DatasetCatalog.list():
        return LVIS_MINIVAL_NAME
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    root = os.path.expanduser(root)
    image_root, json_file = _LVIS_MINIVAL_SPLIT
    register_lvis_instances(
        LVIS_MINIVAL_NAME,
        get_lvis_instances_meta("lvis_v1"),
        os.path.join(root, json_file),
        os.path.join(root, image_root),
    )
    return LVIS_MINIVAL_NAME


def patch_lvis_numpy():
    """
    Make ``lvis==0.5.3`` work with numpy >= 1.24.

    ``lvis.LVISEval.accumulate`` calls ``.astype(dtype=np.float)``; the ``np.float`` alias was
    deprecated in numpy 1.20 and removed in 1.24, so LVIS evaluation dies with AttributeError.
    This restores the alias as the builtin ``float`` (what it always was). Idempotent, and a
    no-op when numpy still has ``np.float``.
    """
    # hasattr is False on numpy >= 1.24 (its module __getattr__ raises AttributeError).
    if not hasattr(np, "float"):
        np.float = float
        logger.debug("Set numpy.float = float for lvis (numpy %s lacks it)", np.__version__)
