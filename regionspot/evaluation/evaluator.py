"""
The evaluation loop of RegionSpot over ``DATASETS.TEST``: one vocabulary, one loader and one
evaluator per dataset, detectron2's ``inference_on_dataset``, and a protocol card per result.

The evaluator's per-image work (``process``: results to COCO json, masks to RLE) runs on a
background thread (:class:`OverlappedEvaluator`) while the model runs on the next image, and the
masks of detections that share a region are RLE-encoded once (:func:`instances_to_coco_json`).
Both give exactly the results of detectron2's sequential evaluation.
"""
import logging
import os
import queue
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.evaluation import coco_evaluation
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..data.mappers import build_regionspot_test_loader
from ..data.lvis import patch_lvis_numpy
from ..data.multi_dataset import dataset_class_names
from .protocol_card import build_protocol_card, write_protocol_cards

logger = logging.getLogger(__name__)

__all__ = [
    "AP_KINDS",
    "EvaluationError",
    "OverlappedEvaluator",
    "build_evaluation_loader",
    "build_regionspot_evaluator",
    "encode_mask_rles",
    "evaluate_datasets",
    "instances_to_coco_json",
    "process_outputs",
]

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
        patch_lvis_numpy()  # detectron2's LVISEvaluator runs lvis==0.5.3's LVISEval
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


# ------------------------------------------------------------------------------------------------
# Results to COCO json, with each distinct mask RLE-encoded once
def encode_mask_rles(masks, groups: Optional[Sequence] = None) -> List[dict]:
    """
    COCO RLEs of binary masks, exactly as detectron2's ``instances_to_coco_json`` makes them
    (``pycocotools.mask.encode`` of each mask in column-major order, ``counts`` as str), with each
    distinct mask encoded once.

    RegionSpot's detections of one region (the region kept with several classes) carry the same
    mask; with 300 detections from a few dozen regions, encoding each detection's mask (a
    column-major copy and a run-length pass over the whole image, ~0.5 ms each at 640 x 480) was
    the bulk of the evaluator's per-image work. Detections are first grouped by ``groups`` (any
    key that equal masks share, e.g. the box); a member of a group reuses the RLE of an earlier
    member only if its mask is equal to it byte for byte, so the result never depends on the
    grouping being right.

    Args:
        masks: [K, H, W] bool or uint8 (torch tensor on the CPU or numpy array).
        groups: [K] hashable keys, or None (one group per detection: nothing is shared).

    Returns:
        K dicts ``{"size": [H, W], "counts": str}``, each a separate object (callers may edit them).
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.numpy()
    masks = np.asarray(masks)
    if masks.dtype == np.bool_:
        masks = masks.view(np.uint8)  # same bytes (0/1): what detectron2's dtype="uint8" copy holds
    k = masks.shape[0]
    if k == 0:
        return []
    owner = np.arange(k)  # owner[i]: the detection whose RLE detection i reuses
    if groups is not None:
        # Earlier detections whose masks were encoded, per group key. A few candidates per key are
        # enough for RegionSpot (one mask per region); the cap bounds the comparisons otherwise.
        encoded_by_key: Dict = {}
        for i in range(k):
            candidates = encoded_by_key.setdefault(groups[i], [])
            for j in candidates:
                if np.array_equal(masks[i], masks[j]):
                    owner[i] = j
                    break
            else:
                if len(candidates) < 4:
                    candidates.append(i)
    unique = np.flatnonzero(owner == np.arange(k))
    # pycocotools encodes an [H, W, N] Fortran-ordered uint8 array: build it as the C-ordered
    # [N, W, H] transpose (one copy) and view it back.
    stack = np.ascontiguousarray(masks[unique].transpose(0, 2, 1)).transpose(2, 1, 0)
    rles = mask_util.encode(stack)
    for rle in rles:
        # As detectron2: json cannot hold bytes, and pycocotools' counts are ASCII.
        rle["counts"] = rle["counts"].decode("utf-8")
    rle_of = dict(zip(unique.tolist(), rles))
    # Separate dicts (and size lists) per detection, as detectron2 gives: the strings are shared.
    return [{key: (list(v) if key == "size" else v) for key, v in rle_of[int(owner[i])].items()} for i in range(k)]


def instances_to_coco_json(instances, img_id) -> List[dict]:
    """
    detectron2's ``instances_to_coco_json`` (same list of dicts, key order and values), with the
    masks encoded by :func:`encode_mask_rles` grouped by box: RegionSpot's detections of one region
    share its box and its mask.

    Instances this fast path does not cover (keypoints, masks other than a [K, H, W] bool/uint8
    tensor or array) go to detectron2's function.
    """
    num_instance = len(instances)
    if num_instance == 0:
        return []
    masks = instances.pred_masks if instances.has("pred_masks") else None
    if isinstance(masks, torch.Tensor):
        binary = masks.dtype in (torch.bool, torch.uint8) and masks.device.type == "cpu"
    else:
        binary = isinstance(masks, np.ndarray) and masks.dtype in (np.bool_, np.uint8)
    if instances.has("pred_keypoints") or (masks is not None and not (binary and masks.ndim == 3)):
        return coco_evaluation.instances_to_coco_json(instances, img_id)

    # From here on as detectron2's instances_to_coco_json (v0.6 / main), masks aside.
    boxes_xyxy = instances.pred_boxes.tensor.numpy()
    boxes = BoxMode.convert(boxes_xyxy, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    boxes = boxes.tolist()
    scores = instances.scores.tolist()
    classes = instances.pred_classes.tolist()
    rles = None
    if masks is not None:
        keys = [row.tobytes() for row in np.ascontiguousarray(boxes_xyxy)]
        rles = encode_mask_rles(masks, keys)

    results = []
    for k in range(num_instance):
        result = {
            "image_id": img_id,
            "category_id": classes[k],
            "bbox": boxes[k],
            "score": scores[k],
        }
        if rles is not None:
            result["segmentation"] = rles[k]
        results.append(result)
    return results


def _process_coco_like(evaluator, inputs, outputs) -> None:
    """
    ``evaluator.process(inputs, outputs)`` for detectron2's ``COCOEvaluator`` / ``LVISEvaluator``
    (their own code, v0.6 / main) with :func:`instances_to_coco_json` as the converter.
    """
    for input, output in zip(inputs, outputs):
        prediction = {"image_id": input["image_id"]}
        if "instances" in output:
            instances = output["instances"].to(evaluator._cpu_device)
            prediction["instances"] = instances_to_coco_json(instances, input["image_id"])
        if "proposals" in output:
            prediction["proposals"] = output["proposals"].to(evaluator._cpu_device)
        # COCOEvaluator keeps an image only if it has something to evaluate; LVISEvaluator always.
        if len(prediction) > 1 or type(evaluator) is LVISEvaluator:
            evaluator._predictions.append(prediction)


def process_outputs(evaluator: DatasetEvaluator, inputs, outputs, fast_masks: bool = True) -> None:
    """
    ``evaluator.process(inputs, outputs)``, with the mask encoding of :func:`instances_to_coco_json`
    for detectron2's own ``COCOEvaluator`` and ``LVISEvaluator`` (exactly those classes: a subclass
    may have changed ``process``) when ``fast_masks``; ``DatasetEvaluators`` are opened up.
    """
    if fast_masks and type(evaluator) is DatasetEvaluators:
        for e in evaluator._evaluators:
            process_outputs(e, inputs, outputs, fast_masks)
    elif fast_masks and type(evaluator) in (COCOEvaluator, LVISEvaluator) and hasattr(evaluator, "_predictions"):
        _process_coco_like(evaluator, inputs, outputs)
    else:
        evaluator.process(inputs, outputs)


# ------------------------------------------------------------------------------------------------
# process() on a background thread
class EvaluationError(RuntimeError):
    """
    The evaluator's ``process`` failed on the background thread of :class:`OverlappedEvaluator`.

    Raised from the original exception (its traceback is the ``__cause__``).

    Attributes:
        image_ids: ``image_id`` of the images of the failed call.
        file_names: their ``file_name`` (None where an input has none).
    """

    def __init__(self, message: str, image_ids: Sequence, file_names: Sequence):
        super().__init__(message)
        self.image_ids = list(image_ids)
        self.file_names = list(file_names)


_STOP = object()


class OverlappedEvaluator(DatasetEvaluator):
    """
    Runs another evaluator's ``process`` on one background thread, so it overlaps with the model's
    forward of the next image instead of adding to it.

    Calls are processed one at a time in the order they were made, by one thread, so the wrapped
    evaluator sees exactly the sequence of a sequential loop and its results are the same.
    ``evaluate`` waits for the queued calls and then calls the wrapped ``evaluate`` on the caller's
    thread (where detectron2 gathers the results of the processes of a launch). At most
    ``max_pending`` calls wait in the queue: ``process`` blocks beyond that, which bounds the
    memory the queued outputs (image-size masks of up to 300 detections each) hold.

    If the wrapped ``process`` raises, the images of the failing call are named in an
    :class:`EvaluationError` raised by the next ``process`` or by ``evaluate``; later calls are
    dropped. The inputs and outputs must not be changed by the caller after ``process`` (detectron2's
    ``inference_on_dataset`` does not).

    Args:
        evaluator: the evaluator whose ``process`` is moved off the caller's thread.
        max_pending: calls queued at most.
        fast_masks: encode equal masks once (:func:`process_outputs`); the results are the same.
    """

    def __init__(self, evaluator: DatasetEvaluator, max_pending: int = 2, fast_masks: bool = True):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending}: at least 1.")
        self.evaluator = evaluator
        self.max_pending = int(max_pending)
        self.fast_masks = bool(fast_masks)
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[EvaluationError] = None

    def reset(self):
        self.close()
        self._error = None
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self._raise_error()
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.max_pending)
            self._thread = threading.Thread(target=self._work, name="regionspot-evaluator", daemon=True)
            self._thread.start()
        self._queue.put((inputs, outputs))

    def evaluate(self):
        self.close()
        self._raise_error()
        return self.evaluator.evaluate()

    def close(self) -> None:
        """Wait for the queued calls and stop the thread. Errors stay for :meth:`evaluate` to raise."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
            self._queue = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error from self._error.__cause__

    def _work(self) -> None:
        # Grad mode is per thread; the outputs come from a no_grad forward, and so does this work.
        with torch.no_grad():
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if self._error is not None:
                    continue  # drop the rest; keep consuming so that process() never blocks for good
                inputs, outputs = item
                try:
                    process_outputs(self.evaluator, inputs, outputs, self.fast_masks)
                except BaseException as e:  # noqa: B902 (any failure must reach the caller's thread)
                    error = _evaluation_error(e, inputs)
                    error.__cause__ = e
                    self._error = error  # published complete: the caller's thread may read it any time


def _evaluation_error(e: BaseException, inputs) -> EvaluationError:
    image_ids = [x.get("image_id") if isinstance(x, dict) else None for x in inputs]
    file_names = [x.get("file_name") if isinstance(x, dict) else None for x in inputs]
    named = ", ".join(
        f"image_id {i!r} ({f})" if f is not None else f"image_id {i!r}" for i, f in zip(image_ids, file_names)
    )
    return EvaluationError(
        f"The evaluator's process() failed on {named or 'an empty batch'} (run on the evaluation's "
        f"background thread): {type(e).__name__}: {e}",
        image_ids,
        file_names,
    )


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
    overlap: bool = True,
) -> Dict[str, dict]:
    """
    Evaluate ``model`` on each dataset, with that dataset's class names as the vocabulary (unless
    ``MODEL.REGIONSPOT.VOCAB.SOURCE`` is "custom"), and write a protocol card for each result.

    Args:
        cfg: the evaluation config.
        model: a built RegionSpot model (or one wrapped in DistributedDataParallel).
        evaluators: one per dataset; default :func:`build_regionspot_evaluator`.
        dataset_names: default ``cfg.DATASETS.TEST``.
        overlap: run the evaluator's ``process`` on a background thread, overlapped with the model
            (:class:`OverlappedEvaluator`); False runs it after each forward on this thread, with
            detectron2's own ``process`` (e.g. to debug it). The results are the same.

    Returns:
        OrderedDict dataset name -> the evaluator's results (e.g. ``{"bbox": {"AP": ...}}``).
    """
    names = list(dataset_names if dataset_names is not None else cfg.DATASETS.TEST)
    base = getattr(model, "module", model)
    head = getattr(base, "roi_heads", None)
    results = OrderedDict()
    cards = []
    for idx, name in enumerate(names):
        if cfg.MODEL.REGIONSPOT.VOCAB.SOURCE == "dataset" and head is not None and hasattr(head, "set_vocabulary"):
            head.set_vocabulary(dataset_class_names(name))
        one = _one_dataset_cfg(cfg, names, idx)
        evaluator = evaluators[idx] if evaluators is not None else build_regionspot_evaluator(one, name)
        loader = build_evaluation_loader(one, name)
        if overlap:
            evaluator = OverlappedEvaluator(evaluator)
            try:
                res = inference_on_dataset(model, loader, evaluator)
            finally:
                evaluator.close()  # the thread stops also when the model or the loader raised
        else:
            res = inference_on_dataset(model, loader, evaluator)
        results[name] = res
        if comm.is_main_process():
            logger.info(f"Evaluation results for {name} in csv format:")
            print_csv_format(res)
            cards.append(build_protocol_card(one, name, model, results=res))
    if comm.is_main_process() and cards:
        write_protocol_cards(cards, cfg.OUTPUT_DIR)
    return results
