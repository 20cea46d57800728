"""
The training datasets of RegionSpot's recipe, registered (lazily, detectron2 style) as COCO-format
datasets under ``$DETECTRON2_DATASETS`` (default ``datasets``):

- ``objects365_v1_train`` / ``objects365_v1_val``: ``objects365/annotations/objects365_{train,val}.json``,
  images under ``objects365/train/`` / ``objects365/val/``;
- ``v3det_train`` / ``v3det_val``: ``v3det/annotations/v3det_2023_v1_{train,val}.json``, images
  under ``v3det/``;
- ``openimages_v6_train`` / ``openimages_v6_val``:
  ``openimages/annotations/openimages_v6_{train,val}_bbox.json``, images under
  ``openimages/train/`` / ``openimages/validation/``.

So the expected layout is::

    $DETECTRON2_DATASETS/
      objects365/            # Objects365 v1 (2019 release, 365 classes)
        annotations/objects365_train.json  objects365_val.json
        train/  val/         # the images; file_name in the json is relative to these
      v3det/                 # V3Det 2023 v1 (~13k classes)
        annotations/v3det_2023_v1_train.json  v3det_2023_v1_val.json
        images/...           # file_name in V3Det's json is "images/<class dir>/<image>.jpg"
      openimages/            # OpenImages v6 boxes (601 classes) converted to COCO json
        annotations/openimages_v6_train_bbox.json  openimages_v6_val_bbox.json
        train/  validation/

Each json is a COCO instances file (``images``, ``annotations`` with XYWH ``bbox``,
``categories`` with ``id`` and ``name``). The category ``name`` is the text the class is encoded
with, so it must be the human-readable name ("Tortoise"), not an OpenImages MID ("/m/011k07").

Nothing is read at registration. The class names (``thing_classes``) come from the json when the
dataset is loaded (``load_coco_json``), or earlier from its ``categories`` alone through
:func:`regionspot.data.multi_dataset.dataset_class_names` (the model registers each training
dataset's vocabulary before the data loader loads the dataset).
"""
import os
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["TRAINING_DATASETS", "register_training_datasets"]

# name -> (json file, image root), relative to the datasets root.
TRAINING_DATASETS: Dict[str, Tuple[str, str]] = {
    "objects365_v1_train": ("objects365/annotations/objects365_train.json", "objects365/train/"),
    "objects365_v1_val": ("objects365/annotations/objects365_val.json", "objects365/val/"),
    "v3det_train": ("v3det/annotations/v3det_2023_v1_train.json", "v3det/"),
    "v3det_val": ("v3det/annotations/v3det_2023_v1_val.json", "v3det/"),
    "openimages_v6_train": ("openimages/annotations/openimages_v6_train_bbox.json", "openimages/train/"),
    "openimages_v6_val": ("openimages/annotations/openimages_v6_val_bbox.json", "openimages/validation/"),
}


def register_training_datasets(root: Optional[str] = None) -> List[str]:
    """
    Register the datasets of :data:`TRAINING_DATASETS` with detectron2's ``register_coco_instances``
    (metadata ``json_file``, ``image_root``, ``evaluator_type="coco"``). Names already registered
    are left untouched.

    Args:
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``datasets``.

    Returns:
        the dataset names.
    """
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    root = os.path.expanduser(root)
    registered = set(DatasetCatalog.list())
    for name, (json_file, image_root) in TRAINING_DATASETS.items():
        if name in registered:
            continue
        register_coco_instances(name, {}, os.path.join(root, json_file), os.path.join(root, image_root))
    return list(TRAINING_DATASETS)
