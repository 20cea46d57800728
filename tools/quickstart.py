#!/usr/bin/env python
"""
Built-in quickstart (the job behind `make quickstart`): no downloads, CPU, a few minutes.

1. generates the coloured-shapes dataset (registered as regionspot_shapes_train / _val),
2. builds RegionSpot with TINY SAM and CLIP of the stock classes and seeded RANDOM weights
   (stand-ins: they recognise nothing real; see the README to use the released weights),
3. evaluates the untrained head on the held-out images with detectron2's COCOEvaluator
   (GT boxes as prompts), trains the fusion module with regionspot.engine.Trainer, evaluates again,
4. writes a few Visualizer images of the held-out set to the output folder.
"""
import argparse
import logging
import os
import sys

import cv2
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from regionspot.config import get_regionspot_cfg  # noqa: E402
from regionspot.engine import Trainer  # noqa: E402

logger = logging.getLogger("regionspot.quickstart")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "Quickstart", "RegionSpot-tiny_shapes.yaml")


# Tiny presets of each family (random weights), as config overrides; any pair can be combined.
TINY_LOCALIZERS = {
    "sam": [],
    "sam2": ["MODEL.REGIONSPOT.LOCALIZER.NAME", "Sam2RegionTokens", "MODEL.REGIONSPOT.LOCALIZER.TYPE", "tiny"],
    "hq-sam": ["MODEL.REGIONSPOT.LOCALIZER.NAME", "HQSamRegionTokens", "MODEL.REGIONSPOT.LOCALIZER.TYPE", "tiny"],
}
TINY_VLMS = {
    "clip": [],
    "openclip": ["MODEL.REGIONSPOT.VLM.NAME", "OpenClipDenseFeatures", "MODEL.REGIONSPOT.VLM.TYPE", "RegionSpot-tiny-OpenCLIP"],
    "eva02": ["MODEL.REGIONSPOT.VLM.NAME", "OpenClipDenseFeatures", "MODEL.REGIONSPOT.VLM.TYPE", "RegionSpot-tiny-EVA02",
              "MODEL.REGIONSPOT.CLIP.INPUT_SIZE", "0"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--output-dir", default="output/quickstart")
    p.add_argument("--num-vis", type=int, default=4, help="held-out images to visualise")
    p.add_argument("--localizer", choices=sorted(TINY_LOCALIZERS), default="sam",
                   help="tiny seeded-random preset of the localizer family (docs/MODELS.md)")
    p.add_argument("--vlm", choices=sorted(TINY_VLMS), default="clip",
                   help="tiny seeded-random preset of the vision-language model family (docs/MODELS.md)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return p.parse_args(argv)


def box_ap(results, dataset_name):
    return results[dataset_name]["bbox"]["AP"]


def visualise(cfg, model, dataset_name, output_dir, count):
    """Draw the model's detections (GT boxes as prompts) on the first `count` held-out images."""
    from regionspot.data import build_regionspot_test_mapper

    mapper = build_regionspot_test_mapper(cfg)
    metadata = MetadataCatalog.get(dataset_name)
    paths = []
    model.eval()
    for d in DatasetCatalog.get(dataset_name)[:count]:
        with torch.no_grad():
            inst = model([mapper(dict(d))])[0]["instances"].to("cpu")
        # One detection per region: its best class (top-k pairs repeat a box with other classes).
        keep = []
        seen = set()
        for i, box in enumerate(inst.pred_boxes.tensor.tolist()):
            if tuple(box) not in seen:
                seen.add(tuple(box))
                keep.append(i)
        inst = inst[keep]
        if inst.has("pred_masks"):
            inst.remove("pred_masks")  # a random-weight SAM's masks are noise: draw boxes only
        vis = Visualizer(read_image(d["file_name"], format="RGB"), metadata, scale=3.0)
        out = vis.draw_instance_predictions(inst)
        path = os.path.join(output_dir, f"vis_{os.path.splitext(os.path.basename(d['file_name']))[0]}.png")
        cv2.imwrite(path, out.get_image()[:, :, ::-1])
        paths.append(path)
    return paths


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(output=args.output_dir, name="detectron2", abbrev_name="d2")
    setup_logger(output=args.output_dir, name="regionspot")
    cfg = get_regionspot_cfg(args.config_file, TINY_LOCALIZERS[args.localizer] + TINY_VLMS[args.vlm] + list(args.opts))
    cfg.OUTPUT_DIR = args.output_dir
    cfg.freeze()
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)

    test_name = cfg.DATASETS.TEST[0]
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = Trainer.test(cfg, trainer.model)
    trainer.train()
    # DefaultTrainer's EvalHook evaluates once after the last iteration; reuse that result.
    after = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    paths = visualise(cfg, trainer.model, test_name, args.output_dir, args.num_vis)

    print(f"box AP before training: {box_ap(before, test_name):.1f} ({test_name}, GT boxes as prompts)")
    print(f"box AP after training:  {box_ap(after, test_name):.1f} ({cfg.SOLVER.MAX_ITER} iterations)")
    print(f"visualisations: {', '.join(paths)}")
    print("Note: SAM and CLIP here are tiny random stand-ins; see README for the released weights.")
    return before, after


if __name__ == "__main__":
    main()
