"""
Protocol cards: one record per evaluation result saying how the number was obtained.

An open-vocabulary AP means little without its protocol: where the boxes came from, which AP
(standard LVIS AP keeps 300 detections per image, fixed AP the top K per class over the dataset),
the image scale, the vocabulary and the weights. :func:`evaluate_datasets` writes one card per
dataset beside the evaluator's files and all of them to ``OUTPUT_DIR/protocol_card.json``.
"""
import datetime
import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import MetadataCatalog

from ..data.atomic_files import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["build_protocol_card", "image_scale_protocol", "write_protocol_cards", "PROTOCOL_CARD_FILE"]

PROTOCOL_CARD_FILE = "protocol_card.json"

# Per-image detections kept by detectron2's LVISEvaluator (the LVIS API's standard cap).
_LVIS_STANDARD_MAX_DETS = 300


def _file_fingerprint(path: str) -> Optional[Dict[str, object]]:
    if not path:
        return None
    info: Dict[str, object] = {"path": path}
    if os.path.isfile(path):
        from ..data.feature_cache import file_sha256

        info["sha256"] = file_sha256(path)
        info["bytes"] = os.path.getsize(path)
    else:  # a URL (detectron2://...) or a file read through another path manager
        info["sha256"] = None
    return info


def _frozen_weights(node, random_init: bool, seed: int) -> Dict[str, object]:
    out: Dict[str, object] = {"type": node.TYPE}
    if node.WEIGHTS:
        out["weights"] = _file_fingerprint(node.WEIGHTS)
    else:
        out["weights"] = None
        out["random_init_seed"] = int(seed) if random_init else None
    return out


def image_scale_protocol(cfg) -> Dict[str, object]:
    """
    How images and prompts are scaled at test time, with a short ``name``:

    - ``authors``: short side ``INPUT.MIN_SIZE_TEST`` (max ``MAX_SIZE_TEST``) first, every
      setting as the authors' evaluation (box x/y ratios swapped, masks thresholded at that scale and
      resized with nearest neighbour, proposals as given);
    - ``authors-resize-fixed``: the same resize with the authors' defects fixed;
    - ``single-resize``: ``MIN_SIZE_TEST`` 0, SAM and CLIP views made from the original image;
    - ``custom``: any other mix.
    """
    rs = cfg.MODEL.REGIONSPOT
    proto = rs.PROTOCOL
    min_size, max_size = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    resized = min_size > 0
    settings = {
        "min_size_test": min_size,
        "max_size_test": max_size,
        "box_rescale": proto.BOX_RESCALE if resized else "none (original size)",
        "mask_resize": proto.MASK_RESIZE if resized else "none (original size)",
        "proposals": proto.PROPOSALS,
        "clip_resize_antialias": bool(rs.CLIP.RESIZE_ANTIALIAS),
    }
    if not resized:
        name = "single-resize"
    elif (proto.BOX_RESCALE, proto.MASK_RESIZE, proto.PROPOSALS) == ("authors", "authors", "as_given"):
        name = "authors"
    elif (proto.BOX_RESCALE, proto.MASK_RESIZE) == ("fixed", "fixed"):
        name = "authors-resize-fixed"
    else:
        name = "custom"
    return {"name": name, **settings}


def _box_source(cfg) -> Dict[str, object]:
    rs = cfg.MODEL.REGIONSPOT
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "GeneralizedRCNN":
        return {"kind": "detector proposals", "proposal_generator": cfg.MODEL.PROPOSAL_GENERATOR.NAME,
                "detector_weights": cfg.MODEL.WEIGHTS}
    if arch == "RegionSpotRelabel":
        return {"kind": "detector boxes", "detector_config": rs.DETECTOR.CONFIG,
                "detector_weights": _file_fingerprint(rs.DETECTOR.WEIGHTS)}
    if rs.BOX_SOURCE == "GT":
        return {"kind": "GT"}
    if rs.BOX_SOURCE == "PROPOSALS":
        files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
        return {
            "kind": "proposal file",
            "files": [_file_fingerprint(f) for f in files],
            "box_scores": "multiplied" if rs.SCORE.USE_BOX_SCORES else "ignored",
            "max_per_image": None if rs.PROTOCOL.PROPOSALS == "as_given" else int(cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST),
        }
    generator = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    kind = "SAM automatic masks" if generator == "SamAutomaticProposals" else "proposal generator"
    return {"kind": kind, "proposal_generator": generator}


def _vocabulary(cfg, dataset_name: str, model) -> Dict[str, object]:
    rs = cfg.MODEL.REGIONSPOT
    head = getattr(getattr(model, "module", model), "roi_heads", None)
    names: Sequence[str] = list(getattr(head, "class_names", []) or [])
    if rs.VOCAB.SOURCE == "custom":
        source = "custom (MODEL.REGIONSPOT.VOCAB.CUSTOM)"
        names = names or list(rs.VOCAB.CUSTOM)
    else:
        source = f"dataset {dataset_name}"
        names = names or list(MetadataCatalog.get(dataset_name).get("thing_classes", []) or [])
    digest = hashlib.sha256("\x1f".join(names).encode("utf-8")).hexdigest()
    return {"source": source, "size": len(names), "names_sha256": digest}


def _ap_kind(cfg, dataset_name: str) -> Dict[str, object]:
    ev = cfg.MODEL.REGIONSPOT.EVAL
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if ev.AP_KIND == "fixed":
        return {"kind": "fixed (Dave et al. 2021)", "topk_per_class": int(ev.FIXED_AP_TOPK_PER_CLASS),
                "max_dets_per_image": None, "tasks": ["bbox"]}
    if evaluator_type == "lvis":
        return {"kind": "standard LVIS", "max_dets_per_image": _LVIS_STANDARD_MAX_DETS}
    return {"kind": f"standard {evaluator_type or 'unknown'}"}


def _versions() -> Dict[str, str]:
    import detectron2
    import torch
    import torchvision

    from .. import __version__

    return {"regionspot": __version__, "detectron2": detectron2.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def build_protocol_card(cfg, dataset_name: str, model=None, results: Optional[dict] = None) -> Dict[str, object]:
    """
    The record of how an evaluation of ``dataset_name`` was obtained.

    Args:
        cfg: the config the evaluation ran with (one test dataset).
        dataset_name: the evaluated dataset.
        model: the evaluated model (its current vocabulary is recorded), or None.
        results: the evaluator's results, copied into the card.

    Returns:
        a JSON-serialisable dict: dataset, box source, AP kind, image-scale protocol, vocabulary,
        scoring (pairs and detections per image), weight fingerprints, versions, results.
    """
    rs = cfg.MODEL.REGIONSPOT
    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file", None)
    card = {
        "dataset": {"name": dataset_name, "json_file": json_file,
                    "split": os.path.splitext(os.path.basename(json_file))[0] if json_file else None},
        "box_source": _box_source(cfg),
        "ap": _ap_kind(cfg, dataset_name),
        "image_scale": image_scale_protocol(cfg),
        "vocabulary": _vocabulary(cfg, dataset_name, model),
        "scoring": {
            "mode": rs.SCORE.MODE,
            "class_score": rs.SCORE.CLASS_SCORE,
            "pairs_per_image": int(rs.SCORE.TOPK) if rs.SCORE.MODE == "topk_pairs" else None,
            "box_score_order": rs.SCORE.BOX_SCORE_ORDER,
            "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
            "score_thresh": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
        },
        "weights": {
            "checkpoint": _file_fingerprint(cfg.MODEL.WEIGHTS),
            "head_weights": _file_fingerprint(rs.HEAD.WEIGHTS),
            "sam": _frozen_weights(rs.SAM, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED),
            "clip": dict(_frozen_weights(rs.CLIP, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED),
                         input_size=int(rs.CLIP.INPUT_SIZE)),
            "frozen_precision": rs.FROZEN.PRECISION,
        },
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "device": cfg.MODEL.DEVICE,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    warnings = []
    if card["vocabulary"]["size"] == 1 and rs.SCORE.CLASS_SCORE == "softmax":
        warnings.append(
            "one-class vocabulary with softmax scores: every score is 1.0, so the AP measures the boxes only "
            "(MODEL.REGIONSPOT.SCORE.CLASS_SCORE sigmoid scores each class on its own)"
        )
    if warnings:
        card["warnings"] = warnings
    if results is not None:
        card["results"] = json.loads(json.dumps(results, default=float))
    return card


def write_protocol_cards(cards: List[Dict[str, object]], output_dir: str) -> str:
    """
    Log each card and write them: all to ``output_dir/protocol_card.json`` (beside detectron2's
    ``metrics.json``) and each to ``output_dir/inference/<dataset>/protocol_card.json``.

    Returns:
        the path of the combined file.
    """
    os.makedirs(output_dir, exist_ok=True)
    for card in cards:
        logger.info("Protocol card of %s:\n%s", card["dataset"]["name"], json.dumps(card, indent=2))
        folder = os.path.join(output_dir, "inference", card["dataset"]["name"])
        os.makedirs(folder, exist_ok=True)
        atomic_write_bytes(os.path.join(folder, PROTOCOL_CARD_FILE), json.dumps(card, indent=2).encode("utf-8"))
    path = os.path.join(output_dir, PROTOCOL_CARD_FILE)
    atomic_write_bytes(path, json.dumps(cards, indent=2).encode("utf-8"))
    return path
