"""
The evaluation loop of RegionSpot over ``DATASETS.TEST``: one vocabulary, one loader and one
evaluator per dataset, detectron2's ``inference_on_dataset``, and a protocol card per result.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional, Sequence

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..data.mappers import build_regionspot_test_loader
from ..data.multi_dataset import dataset_class_names
from .protocol_card import build_protocol_card, write_protocol_cards

logger = logging.getLogger(__name__)

__all__ = ["AP_KINDS", "build_regionspot_evaluator", "evaluate_datasets", "build_evaluation_loader"]

# "standard": detectron2's evaluators (LVIS keeps the 300 best detections per image);
# "fixed": LVIS fixed AP (Dave et al. 2021; the top-K detections per class over the dataset).
AP_KINDS = ("standard", "fixed")


def build_regionspot_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """
    The evaluator of ``dataset_name``: chosen from its metadata's ``evaluator_type`` ("lvis" or
    "coco") and ``MODEL.REGIONSPOT.EVAL.AP_KIND``.

    Raises:
        ValueError: an unknown AP kind, fixed AP asked of a non-LVIS dataset, or a dataset whose
            ``evaluator_type`` RegionSpot does not evaluate.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    ap_kind = cfg.MODEL.REGIONSPOT.EVAL.AP_KIND
    if ap_kind not in AP_KINDS:
        raise ValueError(f"MODEL.REGIONSPOT.EVAL.AP_KIND={ap_kind!r}: use one of {AP_KINDS}.")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if ap_kind == "fixed":
        if evaluator_type != "lvis":
            raise ValueError(
                f"MODEL.REGIONSPOT.EVAL.AP_KIND='fixed' is LVIS fixed AP, but dataset {dataset_name!r} has "
                f"evaluator_type={evaluator_type!r}; use AP_KIND 'standard' for it."
            )
        from .fixed_ap import LVISFixedAPEvaluator

        return LVISFixedAPEvaluator(
            dataset_name, topk_per_class=cfg.MODEL.REGIONSPOT.EVAL.FIXED_AP_TOPK_PER_CLASS, output_dir=output_folder
        )
    if evaluator_type == "lvis":
        return LVISEvaluator(dataset_name, output_dir=output_folder)
    if evaluator_type == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_folder)
    raise ValueError(
        f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); RegionSpot "
        "evaluates 'lvis' and 'coco' datasets: set MetadataCatalog.get(name).evaluator_type."
    )


def build_evaluation_loader(cfg, dataset_name: str):
    """The test loader of one dataset: a detector's own (resized) inputs for ``GeneralizedRCNN``."""
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        return build_detection_test_loader(cfg, dataset_name)
    return build_regionspot_test_loader(cfg, dataset_name)


def _one_dataset_cfg(cfg, names: Sequence[str], index: int):
    one = cfg.clone()
    one.defrost()
    one.DATASETS.TEST = (names[index],)
    if cfg.MODEL.LOAD_PROPOSALS:
        files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
        if len(files) != len(names):
            raise ValueError(
                f"DATASETS.PROPOSAL_FILES_TEST has {len(files)} file(s) for the {len(names)} test datasets "
                f"{list(names)}: give one proposal file per test dataset, in the same order."
            )
        one.DATASETS.PROPOSAL_FILES_TEST = (files[index],)
    one.freeze()
    return one


def evaluate_datasets(
    cfg,
    model,
    evaluators: Optional[Sequence[DatasetEvaluator]] = None,
    dataset_names: Optional[Sequence[str]] = None,
) -> Dict[str, dict]:
    """
    Evaluate ``model`` on each dataset, with that dataset's class names as the vocabulary (unless
    ``MODEL.REGIONSPOT.VOCABULARY`` is "custom"), and write a protocol card for each result.

    Args:
        cfg: the evaluation config.
        model: a built RegionSpot model (or one wrapped in DistributedDataParallel).
        evaluators: one per dataset; default :func:`build_regionspot_evaluator`.
        dataset_names: default ``cfg.DATASETS.TEST``.

    Returns:
        OrderedDict dataset name -> the evaluator's results (e.g. ``{"bbox": {"AP": ...}}``).
    """
    names = list(dataset_names if dataset_names is not None else cfg.DATASETS.TEST)
    base = getattr(model, "module", model)
    head = getattr(base, "roi_heads", None)
    results = OrderedDict()
    cards = []
    for idx, name in enumerate(names):
        if cfg.MODEL.REGIONSPOT.VOCABULARY == "dataset" and head is not None and hasattr(head, "set_vocabulary"):
            head.set_vocabulary(dataset_class_names(name))
        one = _one_dataset_cfg(cfg, names, idx)
        evaluator = evaluators[idx] if evaluators is not None else build_regionspot_evaluator(one, name)
        loader = build_evaluation_loader(one, name)
        res = inference_on_dataset(model, loader, evaluator)
        results[name] = res
        if comm.is_main_process():
            logger.info(f"Evaluation results for {name} in csv format:")
            print_csv_format(res)
            cards.append(build_protocol_card(one, name, model, results=res))
    if comm.is_main_process() and cards:
        write_protocol_cards(cards, cfg.OUTPUT_DIR)
    return results
