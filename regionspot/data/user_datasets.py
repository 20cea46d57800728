"""
Your own COCO-format datasets, registered the detectron2 way from the command line.

detectron2 expects a dataset to be registered in the process that uses it (with
``register_coco_instances`` in your own script). ``train_net.py`` and ``tools/extract_features.py``
also take ``--coco-dataset NAME JSON IMAGE_ROOT`` (repeatable), which does exactly that in every
process ``launch`` starts, so a dataset on disk needs no code::

    python train_net.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_gt-boxes.yaml \\
        --coco-dataset my_train data/train.json data/images --coco-dataset my_val data/val.json data/images \\
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"

The dataset's categories (in id order) are its vocabulary, read from the json before the dataset is
loaded.
"""
import argparse
import logging
import os
from typing import Iterable, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .multi_dataset import read_coco_category_names

logger = logging.getLogger(__name__)

__all__ = ["add_dataset_arguments", "register_coco_datasets"]


def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coco-dataset NAME JSON IMAGE_ROOT`` (repeatable) to ``parser``."""
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (detectron2's register_coco_instances) under NAME, to use "
        "in DATASETS.TRAIN / DATASETS.TEST; repeatable",
    )
    return parser


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """
    Register each (name, json file, image root) with ``register_coco_instances``, with the json's
    class names in the metadata right away (detectron2 sets them only when the dataset is loaded).

    Args:
        specs: (name, json_file, image_root) triples.

    Returns:
        the names registered.

    Raises:
        FileNotFoundError: a json file or image folder does not exist (named, with its dataset).
        ValueError: the json has no COCO "categories", or the name is taken by another dataset.
    """
    names = []
    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"--coco-dataset {name}: annotation file {json_file!r} does not exist.")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"--coco-dataset {name}: image folder {image_root!r} does not exist.")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("json_file", None) == json_file and meta.get("image_root", None) == image_root:
                names.append(name)  # the same registration again (e.g. a second call in one process)
                continue
            raise ValueError(
                f"--coco-dataset {name}: the name is already registered for another dataset; choose another name."
            )
        classes = read_coco_category_names(json_file)
        if not classes:
            raise ValueError(
                f"--coco-dataset {name}: {json_file!r} has no COCO \"categories\" array with \"id\" and \"name\" "
                "entries; RegionSpot needs the class names as its vocabulary."
            )
        register_coco_instances(name, {}, json_file, image_root)
        # The names load_coco_json will set, available before loading (vocabulary, fail-fast checks).
        MetadataCatalog.get(name).thing_classes = classes
        logger.info(f"Registered COCO dataset {name!r}: {len(classes)} classes, {json_file}, images in {image_root}")
        names.append(name)
    return names
