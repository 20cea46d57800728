"""
Checks of a run's inputs made before the model is built (which encodes the vocabulary: minutes
to hours for LVIS on a CPU): weight paths, datasets and their files, proposal files against their
datasets. Each failure names the input, the config key and the fix.
"""
import logging
import os
import pickle
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["check_run_inputs", "check_proposal_file"]

# A proposal file whose boxes mostly lie outside their images was made for another dataset.
_MAX_OUTSIDE_FRACTION = 0.5


def _is_local(path: str) -> bool:
    return "://" not in path


def _check_weight_paths(cfg) -> None:
    rs = cfg.MODEL.REGIONSPOT
    paths = [
        ("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS),
        ("MODEL.REGIONSPOT.SAM.WEIGHTS", rs.SAM.WEIGHTS),
        ("MODEL.REGIONSPOT.CLIP.WEIGHTS", rs.CLIP.WEIGHTS),
        ("MODEL.REGIONSPOT.HEAD.WEIGHTS", rs.HEAD.WEIGHTS),
        ("MODEL.REGIONSPOT.DETECTOR.WEIGHTS", rs.DETECTOR.WEIGHTS),
    ]
    for key, path in paths:
        if path and _is_local(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"{key}={path!r} does not exist: give the path of that file (see the README's Real weights).")


def _check_dataset(name: str, key: str) -> None:
    if name not in DatasetCatalog.list():
        raise ValueError(
            f"{key} names dataset {name!r}, which is not registered. Register it (detectron2's "
            "register_coco_instances, or train_net.py --coco-dataset NAME JSON IMAGE_ROOT) or fix the name."
        )
    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file", None)
    if json_file and _is_local(json_file) and not PathManager.isfile(json_file):
        raise FileNotFoundError(
            f"Annotation file {json_file!r} of dataset {name!r} ({key}) does not exist. The built-in datasets "
            "are read from $DETECTRON2_DATASETS (currently "
            f"{os.environ.get('DETECTRON2_DATASETS', 'datasets')!r}) as detectron2 lays them out."
        )


def check_proposal_file(path: str, dataset_name: str) -> None:
    """
    Check a precomputed-proposal file against the dataset it is used with: readable, in detectron2's
    format, made for that dataset (when it says), covering every image, and boxes inside the images.

    Raises:
        FileNotFoundError, ValueError: naming the file, the dataset and the fix.
    """
    fix = (
        f"Make it with tools/convert_detections_to_proposals.py --dataset {dataset_name} (every image of the "
        "dataset then gets an entry)."
    )
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"Proposal file {path!r} (DATASETS.PROPOSAL_FILES_TEST) does not exist. {fix}")
    try:
        with PathManager.open(path, "rb") as f:
            proposals = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as e:
        raise ValueError(f"Proposal file {path!r} is not a readable pickle ({type(e).__name__}: {e}). {fix}") from e
    if isinstance(proposals, dict):  # detectron2 renames these two keys of older files
        proposals = dict(proposals)
        for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):
            if old in proposals:
                proposals[new] = proposals.pop(old)
    if not isinstance(proposals, dict) or not {"ids", "boxes", "objectness_logits"} <= set(proposals):
        raise ValueError(
            f"Proposal file {path!r} is not a detectron2 proposal file (a dict with 'ids', 'boxes', "
            f"'objectness_logits'). {fix}"
        )
    made_for = proposals.get("dataset")
    if made_for is not None and made_for != dataset_name:
        raise ValueError(
            f"Proposal file {path!r} was made for dataset {made_for!r} but is used with {dataset_name!r}: give "
            f"the file of {dataset_name!r} (DATASETS.PROPOSAL_FILES_TEST, in the order of DATASETS.TEST). {fix}"
        )
    dicts = DatasetCatalog.get(dataset_name)
    index = {str(i): k for k, i in enumerate(proposals["ids"])}
    missing = [d["image_id"] for d in dicts if str(d["image_id"]) not in index]
    if missing:
        raise ValueError(
            f"Proposal file {path!r} has no entry for {len(missing)} of the {len(dicts)} images of dataset "
            f"{dataset_name!r} (e.g. image_id {missing[:5]}): it was made for another dataset or for part of "
            f"this one. {fix}"
        )
    outside = total = 0
    for d in dicts:
        boxes = proposals["boxes"][index[str(d["image_id"])]]
        if len(boxes) == 0 or "height" not in d:
            continue
        h, w = d["height"], d["width"]
        total += len(boxes)
        outside += int(((boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)).sum())
    if total and outside / total > _MAX_OUTSIDE_FRACTION:
        raise ValueError(
            f"{outside} of the {total} boxes of proposal file {path!r} lie entirely outside their images of dataset "
            f"{dataset_name!r}: the file was made for another dataset whose image ids overlap (or its boxes are "
            f"not XYXY in pixels). {fix}"
        )


def check_run_inputs(cfg, eval_only: bool) -> None:
    """
    Fail fast, before the model is built: weight files exist, every dataset of the run is
    registered with its annotation file on disk, and proposal files (one per test dataset) fit their
    datasets.

    Args:
        cfg: the run's config.
        eval_only: only ``DATASETS.TEST`` is used (else ``DATASETS.TRAIN`` too; the trainer
            evaluates ``DATASETS.TEST`` at the end of training, so it is checked as well).
    """
    _check_weight_paths(cfg)
    tests: Sequence[str] = list(cfg.DATASETS.TEST)
    trains: List[str] = [] if eval_only else list(cfg.DATASETS.TRAIN)
    for name in trains:
        _check_dataset(name, "DATASETS.TRAIN")
    for name in tests:
        _check_dataset(name, "DATASETS.TEST")
    if tests and cfg.MODEL.LOAD_PROPOSALS and cfg.MODEL.META_ARCHITECTURE == "RegionSpot":
        files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
        if len(files) != len(tests):
            raise ValueError(
                f"DATASETS.PROPOSAL_FILES_TEST has {len(files)} file(s) for the {len(tests)} test datasets {tests}: "
                "give one proposal file per test dataset, in the same order."
            )
        for path, name in zip(files, tests):
            check_proposal_file(path, name)
            logger.info(f"Proposal file {path} covers every image of {name}")
