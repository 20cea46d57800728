"""
Turn another detector's COCO-format results into detectron2 precomputed proposals.

RegionSpot classifies boxes that come from an external detector (GLIP, GroundingDINO, ...).
Those detectors write COCO detection results, a JSON list of::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}

while detectron2 reads precomputed proposals (``MODEL.LOAD_PROPOSALS = True`` with
``DATASETS.PROPOSAL_FILES_TEST``) from a pickled dict, see
:func:`detectron2.data.build.load_proposals_into_dataset`::

    {
        "ids": list of image ids (matched to the dataset's ``image_id`` through ``str()``),
        "boxes": list of float32 arrays of shape (N_i, 4), one per id,
        "objectness_logits": list of float32 arrays of shape (N_i,), one per id,
        "bbox_mode": BoxMode.XYXY_ABS,
    }

Detectron2 looks every dataset image up in ``ids`` and raises ``KeyError`` for an image that
is missing, so a file meant for a whole dataset must hold an entry for every image, an empty one
where the detector found nothing (pass the dataset's ids as ``image_ids``).

The detector's score ``p`` is stored as the logit ``log(p / (1 - p))`` so that
``sigmoid(objectness_logits)`` gives the score back; RegionSpot multiplies its class
probabilities by it (``MODEL.REGIONSPOT.SCORE.USE_BOX_SCORES``).
"""
import json
import logging
import math
import numbers
import os
import pickle
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from detectron2.structures import BoxMode

from .atomic_files import atomic_write_bytes

__all__ = ["detections_to_proposals", "load_coco_detections", "save_proposals", "score_logits", "SCORE_EPS"]

logger = logging.getLogger(__name__)

# A probability-like score (a detector's, SAM's predicted IoU) becomes a box score logit after
# clipping to [SCORE_EPS, 1 - SCORE_EPS]: proposal files, detector boxes and SAM's automatic
# proposals all use this one constant.
SCORE_EPS = 1e-6

_REQUIRED_KEYS = ("image_id", "bbox", "score")


def _describe(entry: Any, limit: int = 200) -> str:
    text = repr(entry)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _validate_entry(index: int, det: Any) -> None:
    """Raise ``ValueError`` naming ``index`` when ``det`` is not a usable COCO detection."""
    if not isinstance(det, dict):
        raise ValueError(
            f"Detection #{index} is a {type(det).__name__}, not a dict: {_describe(det)}. "
            'Each detection must be a dict like {"image_id": 1, "category_id": 3, '
            '"bbox": [x, y, w, h], "score": 0.9} (COCO results format).'
        )
    missing = [k for k in _REQUIRED_KEYS if k not in det]
    if missing:
        raise ValueError(
            f"Detection #{index} lacks the key(s) {missing}: {_describe(det)}. "
            f"Each detection needs {list(_REQUIRED_KEYS)} (COCO results format: bbox is "
            "[x, y, width, height] in absolute pixels); re-export the detector's results in "
            "COCO format."
        )
    bbox = det["bbox"]
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(_is_number(v) for v in bbox)
    ):
        raise ValueError(
            f"Detection #{index} has bbox {_describe(bbox)}; expected 4 numbers "
            "[x, y, width, height] in absolute pixels (COCO results format)."
        )
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(
            f"Detection #{index} has a non-finite bbox {list(bbox)}; drop or fix that entry."
        )
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(
            f"Detection #{index} (image_id={det['image_id']!r}) has a negative width or height: "
            f"bbox={list(bbox)}. COCO bboxes are [x, y, width, height]; if the file holds "
            "[x1, y1, x2, y2] corners, convert them with width = x2 - x1, height = y2 - y1."
        )
    score = det["score"]
    if not _is_number(score) or not math.isfinite(score):
        raise ValueError(
            f"Detection #{index} has score {_describe(score)}; expected a finite number "
            "(the detector's confidence in [0, 1])."
        )
    image_id = det["image_id"]
    if not isinstance(image_id, (numbers.Integral, str)) or isinstance(image_id, bool):
        raise ValueError(
            f"Detection #{index} has image_id {_describe(image_id)}; expected an int (or str) "
            "matching the dataset's image_id."
        )


def _merge_duplicates(boxes: np.ndarray, scores: np.ndarray):
    """Merge rows of ``boxes`` with identical coordinates, keeping the maximum score."""
    if len(boxes) < 2:
        return boxes, scores
    uniq, inverse = np.unique(boxes, axis=0, return_inverse=True)
    if len(uniq) == len(boxes):
        return boxes, scores
    inverse = inverse.reshape(-1)
    merged = np.full(len(uniq), -np.inf, dtype=scores.dtype)
    np.maximum.at(merged, inverse, scores)
    return uniq, merged


def _score_to_logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(scores.astype(np.float64), SCORE_EPS, 1.0 - SCORE_EPS)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def score_logits(scores: torch.Tensor) -> torch.Tensor:
    """[N] probability-like scores -> [N] float32 logits, clipped to [SCORE_EPS, 1 - SCORE_EPS] first."""
    return torch.logit(scores.float().clamp(SCORE_EPS, 1 - SCORE_EPS))


def _sorted_ids(ids: Iterable[Any]) -> List[Any]:
    ids = list(ids)
    try:
        return sorted(ids)
    except TypeError:  # mixed int / str ids: keep first-seen order
        return ids


def detections_to_proposals(
    detections: List[Dict[str, Any]],
    image_ids: Optional[Iterable[Any]] = None,
    min_score: float = 0.0,
    max_per_image: Optional[int] = None,
    class_agnostic_nms_iou: Optional[float] = None,
    merge_duplicates: bool = False,
) -> Dict[str, Any]:
    """
    Convert COCO-format detection results into detectron2's precomputed-proposal dict.

    Per image, in this order: detections with ``score < min_score`` are dropped; with
    ``merge_duplicates``, boxes reported several times with exactly the same coordinates (GLIP
    writes one entry per class) are merged into one box keeping the maximum score; boxes are
    sorted by descending score; optional class-agnostic NMS (``torchvision.ops.nms``); optional
    cap of ``max_per_image`` boxes. With the defaults every detection becomes a proposal, as in the
    authors' evaluation.
    ``category_id`` (and ``segmentation``) are ignored: RegionSpot classifies the boxes itself.

    Args:
        detections (list[dict]): COCO results, each with ``image_id``, ``bbox`` as
            ``[x, y, width, height]`` in absolute pixels, and ``score`` (in [0, 1]).
        image_ids (iterable or None): the dataset's image ids. If given, the result holds exactly
            these ids in this order, images without detections get empty arrays, and a detection
            of an image not listed raises ``ValueError``. Ids are matched through ``str()``, as
            detectron2 does. If None, the ids are those seen in ``detections`` (sorted).
        min_score (float): keep detections with ``score >= min_score``.
        max_per_image (int or None): keep at most this many boxes per image (highest scores).
            None or 0 keeps all.
        class_agnostic_nms_iou (float or None): IoU threshold of a class-agnostic NMS applied per
            image after merging duplicates. None or 0 disables it.
        merge_duplicates (bool): merge boxes reported several times with identical coordinates.
            Off by default: the authors' protocol uses every box of the detector's file, and since
            the regions of an image attend to each other, merging moves the other regions' logits.

    Returns:
        dict: ``{"ids": list, "boxes": list of float32 (N_i, 4) XYXY_ABS arrays,
        "objectness_logits": list of float32 (N_i,) arrays, "bbox_mode": BoxMode.XYXY_ABS}``,
        boxes sorted by descending score, ``objectness_logits = log(p / (1 - p))`` of the score
        ``p`` clipped to ``[1e-6, 1 - 1e-6]``, so ``sigmoid(objectness_logits)`` is the score.

    Raises:
        ValueError: on malformed input (the message names the offending entry's index) or on
            detections of images not in ``image_ids``.
    """
    if not isinstance(detections, (list, tuple)):
        raise ValueError(
            f"detections must be a list of COCO result dicts, got {type(detections).__name__}. "
            "Load the detector's results JSON with load_coco_detections(path)."
        )
    if not _is_number(min_score) or math.isnan(min_score):
        raise ValueError(f"min_score must be a number, got {min_score!r}.")
    if max_per_image is not None:
        if not isinstance(max_per_image, numbers.Integral) or max_per_image < 0:
            raise ValueError(
                f"max_per_image must be a non-negative int or None, got {max_per_image!r}."
            )
        max_per_image = int(max_per_image) or None
    if class_agnostic_nms_iou is not None:
        if not _is_number(class_agnostic_nms_iou) or not 0.0 <= class_agnostic_nms_iou <= 1.0:
            raise ValueError(
                "class_agnostic_nms_iou must be in [0, 1] (0 or None disables NMS), got "
                f"{class_agnostic_nms_iou!r}."
            )
        class_agnostic_nms_iou = float(class_agnostic_nms_iou) or None

    # Output ids and the str() key detectron2 matches them by.
    if image_ids is not None:
        out_ids = list(image_ids)
        key_to_pos = {}
        for pos, iid in enumerate(out_ids):
            key_to_pos.setdefault(str(iid), pos)
        if len(key_to_pos) != len(out_ids):
            raise ValueError(
                f"image_ids holds {len(out_ids) - len(key_to_pos)} duplicate id(s); "
                "pass each dataset image id once."
            )
    else:
        out_ids, key_to_pos = [], {}

    n = len(detections)
    positions = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.float64)
    scores = np.empty(n, dtype=np.float64)
    unknown: List[Any] = []
    out_of_range = 0
    for i, det in enumerate(detections):
        _validate_entry(i, det)
        key = str(det["image_id"])
        pos = key_to_pos.get(key)
        if pos is None:
            if image_ids is not None:
                unknown.append(det["image_id"])
                positions[i] = -1
                continue
            pos = key_to_pos[key] = len(out_ids)
            out_ids.append(det["image_id"])
        positions[i] = pos
        boxes[i] = det["bbox"]
        s = float(det["score"])
        scores[i] = s
        out_of_range += not 0.0 <= s <= 1.0

    if unknown:
        distinct = list(dict.fromkeys(unknown))
        raise ValueError(
            f"{len(unknown)} detection(s) refer to {len(distinct)} image id(s) that are not in "
            f"the dataset, e.g. image_id={distinct[0]!r}. Check that the results were produced "
            "on the same dataset split (and with the same annotation file) as the dataset "
            "whose ids were given."
        )
    if out_of_range:
        logger.warning(
            "%d detection score(s) lie outside [0, 1]; they are clipped to [%g, %g] before "
            "the logit. Scores should be probabilities.", out_of_range, SCORE_EPS, 1 - SCORE_EPS
        )

    keep = scores >= min_score
    dropped_low = int(n - keep.sum())
    positions, boxes, scores = positions[keep], boxes[keep], scores[keep]

    # Group the detections by output position.
    if image_ids is None:
        # Sort ids for a deterministic, readable file.
        order_ids = _sorted_ids(out_ids)
        remap = np.empty(len(out_ids), dtype=np.int64)
        for new_pos, iid in enumerate(order_ids):
            remap[key_to_pos[str(iid)]] = new_pos
        positions = remap[positions] if len(positions) else positions
        out_ids = order_ids
    order = np.argsort(positions, kind="stable")
    positions, boxes, scores = positions[order], boxes[order], scores[order]
    bounds = np.searchsorted(positions, np.arange(len(out_ids) + 1))

    nms = None
    if class_agnostic_nms_iou is not None:
        import torch
        from torchvision.ops import nms as _nms

        def nms(b, s):
            return _nms(torch.from_numpy(b), torch.from_numpy(s), class_agnostic_nms_iou).numpy()

    out_boxes: List[np.ndarray] = []
    out_logits: List[np.ndarray] = []
    merged_total = suppressed_total = capped_total = 0
    for k in range(len(out_ids)):
        b = boxes[bounds[k] : bounds[k + 1]]
        s = scores[bounds[k] : bounds[k + 1]]
        n_before = len(b)
        if merge_duplicates:
            b, s = _merge_duplicates(b, s)
            merged_total += n_before - len(b)
        # XYWH -> XYXY
        b = b.copy()
        b[:, 2:] += b[:, :2]
        idx = np.argsort(-s, kind="stable")
        b, s = b[idx], s[idx]
        if nms is not None and len(b) > 1:
            kept = nms(b, s)
            suppressed_total += len(b) - len(kept)
            b, s = b[kept], s[kept]
        if max_per_image is not None and len(b) > max_per_image:
            capped_total += len(b) - max_per_image
            b, s = b[:max_per_image], s[:max_per_image]
        out_boxes.append(np.ascontiguousarray(b, dtype=np.float32).reshape(-1, 4))
        out_logits.append(_score_to_logit(s).reshape(-1))

    num_boxes = sum(len(b) for b in out_boxes)
    logger.info(
        "Converted %d detections into %d proposals on %d images (%d empty): dropped %d below "
        "min_score=%g, merged %d duplicate boxes, NMS removed %d, per-image cap removed %d.",
        n, num_boxes, len(out_ids), sum(len(b) == 0 for b in out_boxes), dropped_low,
        min_score, merged_total, suppressed_total, capped_total,
    )
    return {
        "ids": out_ids,
        "boxes": out_boxes,
        "objectness_logits": out_logits,
        "bbox_mode": BoxMode.XYXY_ABS,
    }


def load_coco_detections(path: str) -> List[Dict[str, Any]]:
    """
    Read a COCO-format detection results JSON.

    Args:
        path (str): a JSON file holding a list of detections, or a dict with an
            ``"annotations"`` list (as some exporters write).

    Returns:
        list[dict]: the detections, unvalidated (see :func:`detections_to_proposals`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not JSON or holds neither a list nor a dict with an
            ``"annotations"`` list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Detection results file not found: {path!r}. Pass the COCO-format results JSON "
            "written by the detector (a list of {image_id, category_id, bbox, score})."
        )
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not valid JSON: {e}") from e
    if isinstance(data, dict):
        anns = data.get("annotations")
        if not isinstance(anns, list):
            raise ValueError(
                f"{path!r} holds a JSON object without an 'annotations' list (keys: "
                f"{sorted(data)[:10]}). Expected COCO detection results: a list of "
                "{image_id, category_id, bbox, score} dicts."
            )
        data = anns
    elif not isinstance(data, list):
        raise ValueError(
            f"{path!r} holds a JSON {type(data).__name__}; expected a list of COCO detection "
            "results ({image_id, category_id, bbox, score})."
        )
    logger.info("Loaded %d detections from %s", len(data), path)
    return data


def save_proposals(proposals: Dict[str, Any], path: str) -> None:
    """
    Write a proposal dict as the pickle detectron2 reads (``DATASETS.PROPOSAL_FILES_TEST``).

    The file is written to a temporary file next to ``path`` and moved into place with
    ``os.replace``, so a reader never sees a partial file. Parent directories are created.

    Args:
        proposals (dict): the output of :func:`detections_to_proposals`.
        path (str): destination ``.pkl`` path.

    Returns:
        None

    Raises:
        ValueError: if ``proposals`` lacks a key or its lists differ in length.
    """
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in proposals]
    if missing:
        raise ValueError(
            f"proposals lacks the key(s) {missing}; build it with detections_to_proposals()."
        )
    lengths = {k: len(proposals[k]) for k in ("ids", "boxes", "objectness_logits")}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"proposals' lists differ in length: {lengths}.")

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    atomic_write_bytes(path, pickle.dumps(proposals, protocol=pickle.HIGHEST_PROTOCOL))
    logger.info("Saved proposals of %d images to %s", lengths["ids"], path)
