"""
LVIS "fixed AP" (Dave et al., 2021, "Evaluating Large-Vocabulary Object Detectors: The Devil is in
the Details"): box AP over the top K detections of each category across the whole dataset, with no
cap on the number of detections per image.

The standard LVIS protocol keeps at most 300 detections per image, which couples the categories of
an image: confident detections of one category push out those of another, so AP of a category
depends on how a model spends a per-image budget. Fixed AP instead caps each category separately
(K = 10,000 for LVIS), which makes the AP of a category depend only on its own ranking.
"""
import json
import logging
import os
from collections import OrderedDict

import numpy as np

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..data.lvis import patch_lvis_numpy

__all__ = ["LVISFixedAPEvaluator"]

logger = logging.getLogger(__name__)

# What detectron2's LVISEvaluator reports for "bbox"; the AR keys of the LVIS API are left out
# because with no per-image cap they are named "AR@-1" and mean recall over up to K per category.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
RESULTS_FILE = "lvis_fixed_ap_results.json"
TASK = "bbox-fixed"

# One detection per row. "position" is the index of the detection in its image's output: with the
# image id it names a detection the same way whichever process saw the image, which is what makes
# the tie-break (and so the kept set) independent of how images are sharded.
_DTYPES = {
    "image_id": np.int64,
    "position": np.int32,
    "category": np.int32,
    "score": np.float32,
    "box": np.float32,
}


def _empty_columns():
    columns = {name: np.zeros(0, dtype) for name, dtype in _DTYPES.items()}
    columns["box"] = np.zeros((0, 4), np.float32)
    return columns


def _concatenate(parts):
    if not parts:
        return _empty_columns()
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in _DTYPES}


def _num_rows(columns):
    return len(columns["score"])


def _top_k_per_category(columns, k):
    """
    Keep the ``k`` best detections of each category.

    Args:
        columns (dict[str, np.ndarray]): detection columns (see ``_DTYPES``).
        k (int): detections kept per category.

    Returns:
        dict[str, np.ndarray]: the kept rows, sorted by category, then best first. "Best" is the
        higher score; equal scores go to the lower image id, then the earlier position in the
        image's output.
    """
    n = _num_rows(columns)
    if n == 0:
        return columns
    # lexsort sorts by the last key first.
    order = np.lexsort((columns["position"], columns["image_id"], -columns["score"], columns["category"]))
    category = columns["category"][order]
    group_start = np.flatnonzero(np.r_[True, category[1:] != category[:-1]])
    group_size = np.diff(np.r_[group_start, n])
    rank_in_category = np.arange(n) - np.repeat(group_start, group_size)
    order = order[rank_in_category < k]
    return {name: column[order] for name, column in columns.items()}


class LVISFixedAPEvaluator(DatasetEvaluator):
    """
    Box AP on an LVIS-format dataset with the fixed-AP protocol: for each category the top
    ``topk_per_class`` detections over the whole dataset are evaluated, with no per-image cap.

    Box-only: ``pred_masks`` are ignored, because keeping the masks of up to K detections for each
    of ~1,200 categories cannot be bounded in memory. Only boxes, scores and classes are held, as
    numpy columns; the selection is compacted to the top K per category as images stream in, so
    a process holds at most ``C * K + max(compact_rows, C * K)`` detections (C categories, 36 bytes
    each) plus one image's, about twice that while compacting, whatever the number of images.

    The K detections of a category are counted over all images, including those on which LVIS does
    not evaluate the category (neither annotated nor verified absent there): they are ignored by
    the LVIS API but still take their place in the budget, as in Dave et al.'s protocol, which lets
    no model know which images are evaluated for which category.

    Which of equally scored detections of a category survive the cut is fixed: the one of the lower
    image id, then the one earlier in its image's output. This does not depend on the number of
    processes or on the order in which images arrive.

    Predicted classes are contiguous ids; they are mapped to the dataset's category ids with the
    metadata's ``thing_dataset_id_to_contiguous_id`` when the dataset has one, and otherwise
    contiguous id ``i`` is the ``i``-th smallest category id of the json file (``i + 1`` for LVIS
    v0.5 and v1, as in detectron2's ``LVISEvaluator``).
    """

    def __init__(
        self,
        dataset_name,
        topk_per_class=10000,
        output_dir=None,
        distributed=True,
        *,
        compact_rows=1_000_000,
    ):
        """
        Args:
            dataset_name (str): a registered dataset whose metadata has ``json_file``, an
                LVIS-format json (e.g. one registered with ``register_lvis_instances``).
            topk_per_class (int): K, detections evaluated per category over the whole dataset.
                10,000 is the value of Dave et al. for LVIS.
            output_dir (str or None): if given, the kept detections are saved there as
                ``lvis_fixed_ap_results.json`` (LVIS results format).
            distributed (bool): gather the detections of all processes to the main process
                before evaluating. Otherwise each process evaluates what it saw.
            compact_rows (int): detections buffered before the selection is compacted; the buffer
                also waits until it is as large as the current selection, so that compaction costs
                amortised O(log n) per detection. Small values only make evaluation slower.

        Raises:
            ValueError: K or ``compact_rows`` below 1, or a dataset without ``json_file``.
        """
        if int(topk_per_class) < 1:
            raise ValueError(f"topk_per_class must be >= 1, got {topk_per_class}")
        if int(compact_rows) < 1:
            raise ValueError(f"compact_rows must be >= 1, got {compact_rows}")
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        if self._metadata.get("json_file") is None:
            raise ValueError(
                f"Dataset {dataset_name!r} has no 'json_file' in its metadata; fixed AP needs its "
                "LVIS-format annotations (register it with register_lvis_instances)."
            )
        self._topk = int(topk_per_class)
        self._output_dir = output_dir
        self._distributed = distributed
        self._compact_rows = int(compact_rows)
        self.reset()

    @property
    def topk_per_class(self):
        """int: K, detections evaluated per category."""
        return self._topk

    @property
    def num_rows_held(self):
        """int: detections held by this process now (the selection plus the buffer)."""
        return _num_rows(self._selected) + self._pending_rows

    def reset(self):
        """Forget all detections."""
        self._selected = _empty_columns()
        self._pending = []
        self._pending_rows = 0
        self._num_images = 0

    def process(self, inputs, outputs):
        """
        Add the detections of a batch.

        Args:
            inputs (list[dict]): the model's inputs; each has "image_id".
            outputs (list[dict]): the model's outputs; "instances" (if present) has ``pred_boxes``
                (XYXY, in pixels of the original image), ``scores`` and ``pred_classes``.

        Raises:
            ValueError: a negative predicted class.
        """
        for image_input, output in zip(inputs, outputs):
            self._num_images += 1
            instances = output.get("instances")
            if instances is None or len(instances) == 0:
                continue
            # The three fields are read on their own so that masks are never copied off the device.
            boxes = instances.pred_boxes.tensor.detach().float().cpu().numpy()
            scores = instances.scores.detach().float().cpu().numpy()
            classes = instances.pred_classes.detach().cpu().numpy()
            if classes.min() < 0:
                raise ValueError(f"Negative pred_classes in image {image_input['image_id']}: {classes.min()}")
            n = len(scores)
            self._pending.append(
                {
                    "image_id": np.full(n, image_input["image_id"], np.int64),
                    "position": np.arange(n, dtype=np.int32),
                    "category": classes.astype(np.int32),
                    "score": scores.astype(np.float32),
                    "box": boxes.astype(np.float32).reshape(n, 4),
                }
            )
            self._pending_rows += n
            if self._pending_rows >= max(self._compact_rows, _num_rows(self._selected)):
                self._compact()

    def _compact(self):
        if self._pending_rows == 0:
            return
        self._selected = _top_k_per_category(_concatenate([self._selected] + self._pending), self._topk)
        self._pending = []
        self._pending_rows = 0

    def selected_detections(self):
        """
        The top K detections per category among those this process has seen.

        Returns:
            dict[str, np.ndarray]: read-only columns "image_id" (int64), "position" (int32, index
            in the image's output), "category" (int32, contiguous class), "score" (float32) and
            "box" (float32 [n, 4], XYXY), sorted by category, then best first.
        """
        self._compact()
        views = {}
        for name, column in self._selected.items():
            view = column.view()
            view.flags.writeable = False
            views[name] = view
        return views

    def evaluate(self):
        """
        Select the top K detections per category over all processes and evaluate them.

        Returns:
            OrderedDict or None: ``{"bbox-fixed": {metric: value}}`` with the metrics of
            ``METRICS`` in percent, on the main process (None on the others). A metric is NaN when
            no category it covers has annotations, and all are NaN when there are no detections.
            Empty when no image was processed or the json has no annotations.

        Raises:
            ValueError: a predicted class that maps to no category of the dataset.
        """
        self._compact()
        selected, num_images = self._selected, self._num_images
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((selected, num_images), dst=0)
            if not comm.is_main_process():
                return None
            if len(gathered) > 1:
                # The union of per-process top-K sets holds the global top K of every category.
                selected = _top_k_per_category(_concatenate([part for part, _ in gathered]), self._topk)
                num_images = sum(count for _, count in gathered)

        if num_images == 0:
            logger.warning("[LVISFixedAPEvaluator] Did not receive any image to evaluate.")
            return OrderedDict()
        if _num_rows(selected) == 0:
            logger.warning(
                "[LVISFixedAPEvaluator] No detections in %d images of %s; fixed AP is reported as NaN.",
                num_images,
                self._dataset_name,
            )
            return OrderedDict([(TASK, {metric: float("nan") for metric in METRICS})])

        from lvis import LVIS, LVISEval, LVISResults

        patch_lvis_numpy()
        lvis_gt = LVIS(PathManager.get_local_path(self._metadata.json_file))
        results = self._to_lvis_results(selected, lvis_gt)
        self._warn_short_categories(results, lvis_gt)

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, RESULTS_FILE)
            logger.info("Saving %d fixed-AP detections to %s", len(results), path)
            with PathManager.open(path, "w") as f:
                json.dump(results, f)

        if len(lvis_gt.get_ann_ids()) == 0:
            logger.info("%s has no annotations; fixed AP is not computed.", self._dataset_name)
            return OrderedDict()

        # lvis 0.5.3 caps detections per image only in LVISResults, and only when max_dets >= 0;
        # LVISEval's params.max_dets just names the AR key, set to match.
        lvis_results = LVISResults(lvis_gt, results, max_dets=-1)
        lvis_eval = LVISEval(lvis_gt, lvis_results, iou_type="bbox")
        lvis_eval.params.max_dets = -1
        lvis_eval.run()
        raw = lvis_eval.get_results()
        # The LVIS API reports -1 for a frequency group or area range with no annotated category.
        metrics = {metric: float(raw[metric]) * 100 if raw[metric] >= 0 else float("nan") for metric in METRICS}
        logger.info(
            "Fixed AP (box only; masks are not evaluated) on %s: top %d detections per category, "
            "no per-image cap, %d detections kept from %d images:\n%s",
            self._dataset_name,
            self._topk,
            len(results),
            num_images,
            create_small_table(metrics),
        )
        return OrderedDict([(TASK, metrics)])

    def _category_ids(self, lvis_gt):
        """Array mapping contiguous class -> dataset category id (-1 where there is none)."""
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if mapping:
            lookup = np.full(max(mapping.values()) + 1, -1, np.int64)
            for dataset_id, contiguous_id in mapping.items():
                lookup[contiguous_id] = dataset_id
            return lookup
        return np.asarray(sorted(lvis_gt.get_cat_ids()), np.int64)

    def _to_lvis_results(self, selected, lvis_gt):
        """The selection as an LVIS results list, ordered by image, then output position."""
        lookup = self._category_ids(lvis_gt)
        classes = selected["category"]
        unknown = (classes >= len(lookup)) | (lookup[np.minimum(classes, len(lookup) - 1)] < 0)
        if unknown.any():
            raise ValueError(
                f"pred_classes {sorted(set(classes[unknown].tolist()))[:10]} have no category of "
                f"{self._dataset_name} ({len(lookup)} contiguous ids known)."
            )
        # The LVIS API breaks score ties by its image order and then by list order; this order
        # makes those ties fall the same way as the top-K cut.
        order = np.lexsort((selected["position"], selected["image_id"]))
        boxes = selected["box"][order]
        xywh = boxes.copy()
        xywh[:, 2:] -= boxes[:, :2]
        return [
            {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
            for image_id, category_id, box, score in zip(
                selected["image_id"][order].tolist(),
                lookup[classes[order]].tolist(),
                xywh.tolist(),
                selected["score"][order].tolist(),
            )
        ]

    def _warn_short_categories(self, results, lvis_gt):
        # Dave et al.'s point: a model that emits fewer than K detections of a category gives
        # away recall under fixed AP, so a large count here means the model side emits too few.
        found, counts = np.unique(np.fromiter((r["category_id"] for r in results), np.int64, len(results)),
                                  return_counts=True)
        counts = dict(zip(found.tolist(), counts.tolist()))
        category_ids = lvis_gt.get_cat_ids()
        short = sum(1 for category_id in category_ids if counts.get(category_id, 0) < self._topk)
        if short:
            logger.warning(
                "%d of %d categories of %s have fewer than %d detections; fixed AP counts the missing "
                "ones as misses.",
                short,
                len(category_ids),
                self._dataset_name,
                self._topk,
            )
