#!/usr/bin/env python
"""
Re-score a region store (tools/store_region_embeddings.py) against a new vocabulary and write
COCO-format detections, without running SAM or CLIP's image tower (only the text tower encodes the
vocabulary, through the usual text-embedding cache)::

    python tools/rescore_regions.py --config-file configs/Quickstart/RegionSpot-tiny_shapes.yaml \\
        --store output/regions_shapes --vocabulary "circle,square,triangle" --output output/rescored.json
    # a registered dataset's classes and category ids, and detectron2's evaluator on the result:
    python tools/rescore_regions.py --config-file ... --store ... --dataset regionspot_shapes_val --evaluate

The config must name the models the store was written with (their SHA-256 state-dict fingerprints are
compared; a stale store is refused naming both). Detections are selected as the head does
(MODEL.REGIONSPOT.SCORE.*, TEST.DETECTIONS_PER_IMAGE, empty boxes dropped).
"""
import argparse
import json
import logging
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

logger = logging.getLogger("regionspot.rescore_regions")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--store", required=True, metavar="DIR")
    p.add_argument("--vocabulary", default=None, help='comma-separated class names (category ids 1..C)')
    p.add_argument("--dataset", default=None, help="a registered dataset: its classes and category ids")
    p.add_argument("--output", default=None, metavar="FILE", help="COCO detections JSON")
    p.add_argument("--evaluate", action="store_true", help="run the dataset's detectron2 evaluator (with --dataset)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return p


def rescore(store, predictor, class_names, category_ids):
    """COCO detections (list of dicts) and per-image (record, Instances) of a store for a vocabulary."""
    import torch

    from detectron2.structures import Boxes, Instances

    from regionspot.export.onnx_graphs import model_fingerprints
    from regionspot.export.store import rescore_image

    head = predictor.head
    store.check(model_fingerprints(head))
    predictor.set_vocabulary(class_names)
    classifier = head.classifier
    text = classifier.text_embeddings.cpu()
    detections, per_image = [], []
    with torch.no_grad():
        for record in store.images():
            regions, classes, scores, _ = rescore_image(
                record, text, classifier.logit_scale.cpu(), classifier.class_score, head.selector, head.use_box_scores)
            boxes = torch.from_numpy(record["boxes"])[regions]
            inst = Instances((record["height"], record["width"]))
            inst.pred_boxes, inst.scores, inst.pred_classes = Boxes(boxes), scores, classes
            per_image.append((record, inst))
            rles = record.get("masks_rle")
            for k in range(len(regions)):
                x0, y0, x1, y1 = boxes[k].tolist()
                det = {"image_id": record["image_id"], "category_id": int(category_ids[int(classes[k])]),
                       "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[k])}
                if rles:
                    det["segmentation"] = rles[int(regions[k])]
                detections.append(det)
    return detections, per_image


def main(argv=None):
    args = get_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from regionspot import RegionSpotPredictor
    from regionspot.config import get_regionspot_cfg
    from regionspot.export.store import RegionStore

    store = RegionStore(args.store)
    cfg = get_regionspot_cfg(args.config_file, args.opts)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)  # as the store tool (random stand-in heads)
    predictor = RegionSpotPredictor(cfg)
    if args.dataset:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        DatasetCatalog.get(args.dataset)  # fills the metadata of standard-registered datasets
        meta = MetadataCatalog.get(args.dataset)
        class_names = list(meta.thing_classes)
        mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None) or {i + 1: i for i in range(len(class_names))}
        inverse = {v: k for k, v in mapping.items()}
        category_ids = [inverse[i] for i in range(len(class_names))]
    elif args.vocabulary:
        class_names = [n.strip() for n in args.vocabulary.split(",") if n.strip()]
        category_ids = list(range(1, len(class_names) + 1))
    else:
        raise SystemExit("Give --vocabulary NAMES or --dataset NAME.")
    detections, per_image = rescore(store, predictor, class_names, category_ids)
    logger.info(f"{len(detections)} detections on {len(per_image)} images for {len(class_names)} classes.")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(detections, f)
        with open(os.path.splitext(args.output)[0] + ".categories.json", "w") as f:
            json.dump([{"id": i, "name": n} for i, n in zip(category_ids, class_names)], f)
    if args.evaluate:
        if not args.dataset:
            raise SystemExit("--evaluate needs --dataset.")
        from regionspot.evaluation.evaluator import build_regionspot_evaluator

        evaluator = build_regionspot_evaluator(cfg, args.dataset, os.path.join(args.store, "evaluation"))
        evaluator.reset()
        for record, inst in per_image:
            evaluator.process([{"image_id": record["image_id"], "file_name": record["file_name"],
                                "height": record["height"], "width": record["width"]}], [{"instances": inst}])
        print(json.dumps(evaluator.evaluate(), indent=2, default=float))


if __name__ == "__main__":
    main()
