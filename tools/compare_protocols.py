#!/usr/bin/env python
"""
Measure how much the evaluation protocols differ, side by side in one run, on real photos with
boxes and GLIP-like box scores.

    python tools/compare_protocols.py --variant BB --num-boxes 100
    python tools/compare_protocols.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_proposals.yaml \\
        MODEL.WEIGHTS weights/regionspot_bb.pth MODEL.REGIONSPOT.SAM.WEIGHTS ... (real weights)

Without weights the model is the chosen variant's architecture with seeded random weights (SAM,
CLIP and the fusion module): the figures then say how far the protocols move the numbers, not what
a trained model scores. Each protocol runs the evaluation forward (the test mapper and
``model.inference``) on the same image and proposal set; the reference is the authors' protocol
(800/1333, their box scaling, masks and scoring order, no antialias). Reported per comparison:
the largest logit difference, how many of the kept detections (region, class) differ, and the mask
IoU of detections kept by both.
"""
import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, pairwise_iou

import regionspot  # noqa: F401  (registers the meta-architecture)
from regionspot import RegionSpotCheckpointer
from regionspot.config import get_regionspot_cfg
from regionspot.data import build_regionspot_test_mapper

logger = logging.getLogger("regionspot.compare_protocols")

VARIANTS = {"BB": "configs/Base-RegionSpot-BB.yaml", "BL": "configs/Base-RegionSpot-BL.yaml",
            "BL336": "configs/Base-RegionSpot-BL336.yaml", "tiny": "configs/Quickstart/RegionSpot-tiny_shapes.yaml"}

# name -> config overrides on top of the authors' protocol
PROTOCOLS = {
    "authors": [],
    "authors, CLIP view antialiased (torchvision >= 0.17)": ["MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS", True],
    "fixed box rescale": ["MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE", "fixed"],
    "fixed mask resize": ["MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE", "fixed"],
    "box score before top-k": ["MODEL.REGIONSPOT.SCORE.BOX_SCORE_ORDER", "before_topk"],
    "single-resize (original image)": ["INPUT.MIN_SIZE_TEST", 0],
    "boxes clipped, empty ones dropped (detectron2 proposals)": ["MODEL.REGIONSPOT.PROTOCOL.PROPOSALS", "detectron2"],
    # The proposal file itself differs: duplicate boxes merged (keeping the best score).
    "duplicate boxes merged": [],
}
MERGED = "duplicate boxes merged"


def photos():
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def glip_like_proposals(height, width, num, seed):
    """Random boxes (a third of them repeated, as GLIP writes one entry per class) with skewed scores."""
    rng = np.random.default_rng(seed)
    n_unique = num - num // 3
    xy = rng.uniform(0, [width * 0.9, height * 0.9], size=(n_unique, 2))
    wh = rng.uniform(4, [width / 2, height / 2], size=(n_unique, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [width + 8, height + 8])], axis=1)
    boxes = np.concatenate([boxes, boxes[rng.integers(0, n_unique, num - n_unique)]])
    scores = rng.beta(0.6, 2.0, size=num).clip(1e-3, 1 - 1e-3)
    order = np.argsort(-scores, kind="stable")
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)


def merged_record(record):
    """The record with boxes of identical coordinates merged into one, keeping the best score."""
    boxes, logits = record["proposal_boxes"], record["proposal_objectness_logits"]
    _, first = np.unique(boxes, axis=0, return_index=True)  # sorted by score: the first is the best
    keep = np.sort(first)
    return dict(record, proposal_boxes=boxes[keep], proposal_objectness_logits=logits[keep], kept_rows=keep)


def build_cfg(args, overrides):
    cfg = get_regionspot_cfg(args.config_file or VARIANTS[args.variant], args.opts)
    cfg.merge_from_list([
        "MODEL.DEVICE", args.device, "MODEL.LOAD_PROPOSALS", True, "MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS",
        "DATASETS.TEST", (), "DATASETS.TRAIN", (), "MODEL.REGIONSPOT.VOCAB.SOURCE", "dataset",
        "INPUT.MIN_SIZE_TEST", 800, "INPUT.MAX_SIZE_TEST", 1333, "MODEL.REGIONSPOT.SCORE.TOPK", 900,
        "TEST.DETECTIONS_PER_IMAGE", 300, "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", 1000,
        "MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE", "authors", "MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE", "authors",
        "MODEL.REGIONSPOT.PROTOCOL.PROPOSALS", "as_given", "MODEL.REGIONSPOT.SCORE.BOX_SCORE_ORDER", "after_topk",
        "MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS", False,
    ])
    if not cfg.MODEL.REGIONSPOT.SAM.WEIGHTS or not os.path.isfile(cfg.MODEL.REGIONSPOT.SAM.WEIGHTS):
        cfg.merge_from_list(["MODEL.REGIONSPOT.FROZEN.RANDOM_INIT", True, "MODEL.REGIONSPOT.SAM.WEIGHTS", "",
                             "MODEL.REGIONSPOT.CLIP.WEIGHTS", "", "MODEL.WEIGHTS", ""])
    cfg.merge_from_list(overrides)
    cfg.freeze()
    return cfg


def set_vocabulary(head, cfg, num_classes):
    """
    LVIS's class names encoded by CLIP with real weights; with random weights, seeded random unit
    vectors (encoding 97k sentences with a random text tower would only cost time).
    """
    if cfg.MODEL.REGIONSPOT.FROZEN.RANDOM_INIT:
        g = torch.Generator().manual_seed(1)
        emb = torch.randn(num_classes, head.clip.embed_dim, generator=g)
        head.set_vocabulary([f"class {i}" for i in range(num_classes)], emb / emb.norm(dim=1, keepdim=True))
        return
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    names = [c["name"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])][:num_classes]
    head.set_vocabulary(names)


def run_protocol(model, cfg, record, file_record=None):
    """
    The evaluation forward of one image (logits of every region recorded on the way); detections
    are named by the box of ``file_record`` (default ``record``) they came from.
    """
    head = model.roi_heads
    recorded = []
    logits_fn = head.classifier.forward
    head.classifier.forward = lambda *a, **k: recorded.append(logits_fn(*a, **k)) or recorded[-1]
    try:
        inputs = [build_regionspot_test_mapper(cfg)(record)]
        with torch.no_grad():
            inst = model.inference(inputs)[0]["instances"].to("cpu")
    finally:
        del head.classifier.forward
    masks = inst.pred_masks if inst.has("pred_masks") else None
    # A detection is (the file's box it came from, class): its output box is matched to the file's
    # boxes by IoU (identical boxes go to the first), so protocols that scale, clip or merge boxes
    # still compare the same regions.
    file_boxes = Boxes(torch.as_tensor((file_record or record)["proposal_boxes"], dtype=torch.float32))
    source = pairwise_iou(inst.pred_boxes, file_boxes).argmax(dim=1) if len(inst) else torch.zeros(0, dtype=torch.long)
    return {"logits": recorded[0].cpu(), "rows": record.get("kept_rows"),
            "pairs": list(zip(source.tolist(), inst.pred_classes.tolist())),
            "masks": masks, "count": len(inst)}


def compare(ref, other):
    out = {"kept": other["count"]}
    ref_logits = ref["logits"] if other["rows"] is None else ref["logits"][torch.as_tensor(other["rows"])]
    if ref_logits.shape == other["logits"].shape:
        out["max_logit_diff"] = float((ref_logits - other["logits"]).abs().max())
    ref_pairs = {p: i for i, p in enumerate(ref["pairs"])}
    common = [(ref_pairs[p], j) for j, p in enumerate(other["pairs"]) if p in ref_pairs]
    out["kept_detections_changed"] = ref["count"] - len(common)
    if ref["masks"] is not None and other["masks"] is not None and common:
        a = ref["masks"][[i for i, _ in common]]
        b = other["masks"][[j for _, j in common]]
        inter = (a & b).flatten(1).sum(1).float()
        union = (a | b).flatten(1).sum(1).float().clamp(min=1)
        out["mask_iou_mean"] = float((inter / union).mean())
    return out


def mask_resize_by_object_size(sam, sizes, original=(480, 640), min_size=800, max_size=1333):
    """
    Masks of discs of known diameters through both MASK_RESIZE paths, against the true disc.

    SAM-like low-resolution logits are made from the signed distance to a disc (drawn in SAM's
    frame of the 800-scale image); "fixed" up-samples them to the original size and thresholds,
    "authors" thresholds at the 800 scale and resizes with nearest neighbour. Returns, per
    diameter (original pixels), the IoU between the two and of each with the exact disc.
    """
    from detectron2.data import transforms as T

    from regionspot.modeling.masks import SamMasks

    h0, w0 = original
    tr = T.ResizeShortestEdge(min_size, max_size).get_transform(np.zeros((h0, w0, 3), np.uint8))
    h8, w8 = tr.new_h, tr.new_w
    side = sam.image_encoder.img_size
    scale = side / max(h8, w8)
    input_size = (int(h8 * scale + 0.5), int(w8 * scale + 0.5))
    low = side // 4
    out = {}
    for d in sizes:
        cy, cx = h0 * 0.5 + 0.3, w0 * 0.5 + 0.7  # off the pixel grid
        # the disc in low-res logit coordinates (low-res pixel = 4 px of SAM's 1024 frame)
        f = (h8 / h0) * scale / 4.0
        yy, xx = torch.meshgrid(torch.arange(low) + 0.5, torch.arange(low) + 0.5, indexing="ij")
        dist = ((yy - cy * f) ** 2 + (xx - cx * f) ** 2).sqrt()
        logits = ((d / 2 * f - dist) * 8.0)[None, None]
        yy0, xx0 = torch.meshgrid(torch.arange(h0) + 0.5, torch.arange(w0) + 0.5, indexing="ij")
        truth = ((yy0 - cy) ** 2 + (xx0 - cx) ** 2) <= (d / 2) ** 2
        masks = {mode: SamMasks(logits, torch.zeros(1, dtype=torch.long), sam, input_size, (h8, w8), mode)
                 .to_bitmasks(None, h0, w0).tensor[0] for mode in ("authors", "fixed")}

        def iou(a, b):
            return float((a & b).sum()) / max(float((a | b).sum()), 1.0)

        out[d] = {"authors_vs_fixed": iou(masks["authors"], masks["fixed"]),
                  "authors_vs_disc": iou(masks["authors"], truth), "fixed_vs_disc": iou(masks["fixed"], truth)}
    return {"original_size": [h0, w0], "resized": [h8, w8], "by_diameter_px": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="BB", choices=sorted(VARIANTS))
    parser.add_argument("--config-file", default="", help="a RegionSpot config (default: the variant's base)")
    parser.add_argument("--num-boxes", type=int, default=100)
    parser.add_argument("--num-classes", type=int, default=1203, help="vocabulary size (LVIS: 1203)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="", help="write the figures as JSON here")
    parser.add_argument("--mask-diameters", type=float, nargs="*", default=[5, 10, 20, 40, 80],
                        help="disc diameters (original pixels) of the mask-resize measurement")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = {"variant": args.config_file or args.variant, "num_boxes": args.num_boxes,
               "num_classes": args.num_classes, "images": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name, image in photos().items():
            path = os.path.join(tmp, f"{name}.png")
            Image.fromarray(image).save(path)
            boxes, scores = glip_like_proposals(*image.shape[:2], args.num_boxes, seed=len(results["images"]))
            record = {"file_name": path, "height": image.shape[0], "width": image.shape[1], "image_id": 0,
                      "proposal_boxes": boxes, "proposal_objectness_logits": np.log(scores) - np.log1p(-scores),
                      "proposal_bbox_mode": BoxMode.XYXY_ABS}
            outs = {}
            for proto, overrides in PROTOCOLS.items():
                cfg = build_cfg(args, overrides)
                key = cfg.MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS
                if key not in models:  # one model per CLIP view setting (same seeded weights)
                    torch.manual_seed(0)
                    models[key] = build_model(cfg).eval()
                    if cfg.MODEL.WEIGHTS:
                        RegionSpotCheckpointer(models[key]).load(cfg.MODEL.WEIGHTS)
                    set_vocabulary(models[key].roi_heads, cfg, args.num_classes)
                model = models[key]
                head = model.roi_heads
                head.selector.box_score_order = cfg.MODEL.REGIONSPOT.SCORE.BOX_SCORE_ORDER
                head.mask_resize = cfg.MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE
                start = time.perf_counter()
                outs[proto] = run_protocol(model, cfg, merged_record(record) if proto == MERGED else record, record)
                logger.info("%s / %s: %.1f s", name, proto, time.perf_counter() - start)
            results["images"][name] = {
                "size": list(image.shape[:2]),
                **{proto: compare(outs["authors"], outs[proto]) for proto in PROTOCOLS if proto != "authors"},
            }
            print(f"{name} {image.shape[1]}x{image.shape[0]}:")
            for proto, figures in results["images"][name].items():
                if proto != "size":
                    print(f"  {proto:58s} {json.dumps(figures)}")
    sam = next(iter(models.values())).roi_heads.sam.sam
    results["mask_resize"] = mask_resize_by_object_size(sam, args.mask_diameters)
    print("mask resize, discs in a 640x480 image (IoU):")
    for d, figures in results["mask_resize"]["by_diameter_px"].items():
        print(f"  diameter {d:5.1f} px  {json.dumps({k: round(v, 3) for k, v in figures.items()})}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
