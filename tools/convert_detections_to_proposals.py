#!/usr/bin/env python
"""
Convert a detector's COCO-format results JSON (GLIP, GroundingDINO, ...) into the precomputed
proposal pickle detectron2 reads, so RegionSpot can classify those boxes:

    python tools/convert_detections_to_proposals.py \\
        --detections glip_lvis_val_results.json --output proposals/glip_lvis_val.pkl \\
        --dataset lvis_v1_val

then evaluate with ``MODEL.LOAD_PROPOSALS True DATASETS.PROPOSAL_FILES_TEST
"('proposals/glip_lvis_val.pkl',)" MODEL.REGIONSPOT.BOX_SOURCE PROPOSALS``.

With ``--dataset`` every image of that (registered) dataset gets an entry, an empty one where the
detector found nothing; detectron2 raises KeyError for an image missing from the file. By default
every detection of the file becomes a prompt (the authors' protocol: no merging of duplicate
boxes, no cap); ``--merge-duplicates``, ``--max-per-image`` and ``--nms-iou`` change the set of
boxes, and with it every region's logits (the regions of an image attend to each other).
"""
import argparse
import importlib.util
import logging
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_proposals_module():
    """Import regionspot.data.proposals, without requiring the rest of the package to import."""
    try:
        from regionspot.data import proposals

        return proposals
    except ImportError:
        pass
    path = os.path.join(_REPO_ROOT, "regionspot", "data", "proposals.py")
    spec = importlib.util.spec_from_file_location("regionspot.data.proposals", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset_image_ids(name, logger):
    from detectron2.data import DatasetCatalog  # registers detectron2's builtin datasets

    if name not in DatasetCatalog.list():
        try:
            import regionspot  # noqa: F401  (may register more datasets)
        except ImportError as e:
            logger.warning("Could not import regionspot to look for more datasets: %s", e)
    if name not in DatasetCatalog.list():
        close = [n for n in DatasetCatalog.list() if name.split("_")[0] in n][:20]
        raise SystemExit(
            f"Dataset {name!r} is not registered. Similar registered names: {close}. "
            "Register it (e.g. detectron2.data.datasets.register_coco_instances) or pass a "
            "registered name."
        )
    dicts = DatasetCatalog.get(name)
    ids = [d["image_id"] for d in dicts]
    logger.info("Dataset %s: %d images", name, len(ids))
    return ids


def get_parser():
    parser = argparse.ArgumentParser(
        description="Convert COCO-format detection results into a detectron2 proposal pickle."
    )
    parser.add_argument("--detections", required=True, help="COCO results JSON of the detector")
    parser.add_argument("--output", required=True, help="proposal .pkl to write")
    parser.add_argument(
        "--dataset",
        default=None,
        help="registered dataset name (e.g. lvis_v1_val): every image gets an entry and "
        "detections of other images are an error",
    )
    parser.add_argument(
        "--min-score", type=float, default=0.0, help="drop detections below this score"
    )
    parser.add_argument(
        "--max-per-image",
        type=int,
        default=0,
        help="keep at most this many boxes per image (0, the default: all, as the authors' protocol)",
    )
    parser.add_argument(
        "--merge-duplicates",
        action="store_true",
        help="merge boxes reported several times with identical coordinates (keeping the best score); "
        "off by default: the authors' protocol uses every box, and regions attend to each other",
    )
    parser.add_argument(
        "--nms-iou",
        type=float,
        default=0.0,
        help="IoU threshold of a class-agnostic NMS per image (0: no NMS)",
    )
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2")
    setup_logger(name="regionspot")
    logger = logging.getLogger("regionspot.convert_detections_to_proposals")

    if args.max_per_image < 0:
        raise SystemExit("--max-per-image must be >= 0 (0 keeps all boxes).")
    if not 0.0 <= args.nms_iou <= 1.0:
        raise SystemExit("--nms-iou must be in [0, 1] (0 disables NMS).")

    if _REPO_ROOT not in sys.path:
        sys.path.insert(0, _REPO_ROOT)
    proposals_mod = _import_proposals_module()

    try:
        detections = proposals_mod.load_coco_detections(args.detections)
        image_ids = _dataset_image_ids(args.dataset, logger) if args.dataset else None
        proposals = proposals_mod.detections_to_proposals(
            detections,
            image_ids=image_ids,
            min_score=args.min_score,
            max_per_image=args.max_per_image or None,
            class_agnostic_nms_iou=args.nms_iou or None,
            merge_duplicates=args.merge_duplicates,
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if args.dataset:
        # Lets evaluation refuse the file when it is given with another dataset (detectron2 ignores the key).
        proposals["dataset"] = args.dataset
    proposals_mod.save_proposals(proposals, args.output)

    num_images = len(proposals["ids"])
    num_boxes = sum(len(b) for b in proposals["boxes"])
    num_empty = sum(len(b) == 0 for b in proposals["boxes"])
    mean = num_boxes / num_images if num_images else 0.0
    print(
        f"Wrote {args.output}: {num_images} images ({num_empty} without boxes), "
        f"{num_boxes} boxes, {mean:.1f} boxes per image on average."
    )


if __name__ == "__main__":
    main()
