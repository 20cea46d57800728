#!/usr/bin/env python
"""
Run a RegionSpot model over images with boxes and store each region's box, L2-normalised region
embedding and mask score (and, with --masks, its RLE mask) in sharded files with a manifest, to
re-score against any vocabulary later with tools/rescore_regions.py (no SAM, no CLIP image tower)::

    # a registered dataset, its GT boxes (or proposals: DATASETS.PROPOSAL_FILES_TEST + MODEL.LOAD_PROPOSALS True)
    python tools/store_region_embeddings.py --config-file configs/Quickstart/RegionSpot-tiny_shapes.yaml \\
        --dataset regionspot_shapes_val --output output/regions_shapes
    # a folder of images with a JSON of boxes {"file name": [[x0, y0, x1, y1], ...]}
    python tools/store_region_embeddings.py --config-file ... --image-dir photos/ --boxes boxes.json --output ...

Resumable: images already in the store are skipped (re-run the same command). With --num-workers N
the images are split across N processes (detectron2's ``launch``), each writing its own shards.
The protocol is the predictor's: SAM's and CLIP's views of the original image, the given boxes as
prompts, all regions of an image decoded together.
"""
import argparse
import json
import logging
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

logger = logging.getLogger("regionspot.store_region_embeddings")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, metavar="DIR", help="the store directory")
    p.add_argument("--dataset", default=None, help="a registered detectron2 dataset")
    p.add_argument("--image-dir", default=None, help="a folder of images (with --boxes)")
    p.add_argument("--boxes", default=None, help='JSON {"file name": [[x0, y0, x1, y1], ...]} for --image-dir')
    p.add_argument("--masks", action="store_true", help="also store RLE masks")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard file")
    p.add_argument("--num-workers", type=int, default=1, help="processes (detectron2's launch)")
    p.add_argument("--max-images", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return p


def list_images(args) -> list:
    """(key, image_id, file_name, boxes [N, 4] XYXY, objectness logits [N] or None) per image."""
    import numpy as np

    items = []
    if args.dataset:
        from detectron2.data import DatasetCatalog
        from detectron2.structures import BoxMode

        for d in DatasetCatalog.get(args.dataset):
            if "proposal_boxes" in d:
                boxes = BoxMode.convert(np.asarray(d["proposal_boxes"], np.float64), d["proposal_bbox_mode"], BoxMode.XYXY_ABS)
                logits = np.asarray(d.get("proposal_objectness_logits"), np.float32) if "proposal_objectness_logits" in d else None
            else:
                anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
                boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns], np.float64)
                logits = None
            items.append((str(d["image_id"]), int(d["image_id"]), d["file_name"], boxes.reshape(-1, 4), logits))
    elif args.image_dir and args.boxes:
        with open(args.boxes) as f:
            table = json.load(f)
        for i, name in enumerate(sorted(table)):
            items.append((name, i + 1, os.path.join(args.image_dir, name), np.asarray(table[name], np.float64).reshape(-1, 4), None))
    else:
        raise SystemExit("Give --dataset NAME, or --image-dir DIR with --boxes FILE.")
    return items[: args.max_images] if args.max_images > 0 else items


def build(args):
    import torch

    from regionspot import RegionSpotPredictor
    from regionspot.config import get_regionspot_cfg

    cfg = get_regionspot_cfg(args.config_file, args.opts)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()  # no vocabulary is needed to store embeddings
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    predictor = RegionSpotPredictor(cfg)
    # The embeddings do not depend on the vocabulary: a placeholder one (no text encoded) lets predict() run.
    placeholder = torch.eye(2, int(predictor.head.classifier.embed_dim))
    predictor.set_vocabulary(["region", "other region"], placeholder)
    return cfg, predictor


def store_manifest(args, cfg, predictor) -> dict:
    from regionspot.export.onnx_graphs import model_fingerprints

    head = predictor.head
    rs = cfg.MODEL.REGIONSPOT
    return {
        "fingerprints": model_fingerprints(head),
        "protocol": {
            "views": "predictor (SAM ResizeLongestSide and CLIP's bilinear view of the original image)",
            "clip_input_size": int(rs.CLIP.INPUT_SIZE),
            "clip_antialias": bool(rs.CLIP.RESIZE_ANTIALIAS),
            "frozen_precision": rs.FROZEN.PRECISION,
            "embedding": "region / (||region|| + 1e-7), float32",
        },
        "logit_scale": float(head.classifier.logit_scale),
        "embed_dim": int(head.classifier.embed_dim),
        "source": {"dataset": args.dataset, "image_dir": args.image_dir, "boxes": args.boxes},
        "config": {"file": args.config_file, "opts": list(args.opts), "weights": cfg.MODEL.WEIGHTS,
                   "sam_weights": rs.SAM.WEIGHTS, "clip_weights": rs.CLIP.WEIGHTS},
        "masks": bool(args.masks),
    }


def worker(args):
    import numpy as np
    from tqdm import tqdm

    from detectron2.data.detection_utils import read_image
    from detectron2.utils import comm

    from regionspot.export.store import RegionStore

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, predictor = build(args)
    rank, world = comm.get_rank(), comm.get_world_size()
    manifest = store_manifest(args, cfg, predictor)
    if rank == 0:
        store = RegionStore.create(args.output, manifest)
    comm.synchronize()
    store = RegionStore.create(args.output, manifest)  # checks the fingerprints on every rank
    done = store.done_images()
    items = [it for it in list_images(args)[rank::world] if it[0] not in done]
    if rank == 0:
        logger.info(f"{len(done)} images already stored; {len(items)} to go on rank 0 of {world}.")
    batch = []
    for key, image_id, file_name, boxes, objectness in tqdm(items, desc=f"regions (rank {rank})", disable=rank != 0):
        image = read_image(file_name, format="RGB")
        predictor.set_image(image)
        n = len(boxes)
        if n:
            out = predictor.predict(boxes, return_masks=args.masks, return_embeddings=True)
            record = {k: out[k].cpu().numpy() for k in ("embeddings", "mask_scores", "empty_box")}
        else:
            dim = int(predictor.head.classifier.embed_dim)
            record = {"embeddings": np.zeros((0, dim), np.float32), "mask_scores": np.zeros(0, np.float32),
                      "empty_box": np.zeros(0, bool)}
        record.update(key=key, image_id=image_id, file_name=file_name, height=image.shape[0], width=image.shape[1],
                      boxes=boxes, box_scores=objectness if objectness is not None else np.full(n, np.nan, np.float32))
        if args.masks:
            from regionspot.evaluation.evaluator import encode_mask_rles

            record["masks_rle"] = encode_mask_rles(out["masks"].cpu()) if n else []
        batch.append(record)
        if len(batch) >= args.shard_size:
            store.write_shard(batch, rank)
            batch = []
    store.write_shard(batch, rank)
    comm.synchronize()


def main(argv=None):
    args = get_parser().parse_intermixed_args(argv)
    if args.num_workers > 1:
        from functools import partial

        from detectron2.engine import launch

        from regionspot.engine import run_then_close

        launch(partial(run_then_close, worker), args.num_workers, dist_url="auto", args=(args,))
    else:
        worker(args)


if __name__ == "__main__":
    main()
