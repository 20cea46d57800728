#!/usr/bin/env python
"""
Export a RegionSpot model to ONNX graphs that reproduce ``RegionSpotPredictor`` (SAM's image encoder,
SAM's prompt decoder, CLIP's dense features, the fusion head with the vocabulary as an input, CLIP's
text tower) and a ``manifest.json``; run them with ``regionspot.export.OnnxRegionSpotPredictor``::

    python tools/export_onnx.py --config-file configs/Quickstart/RegionSpot-tiny_shapes.yaml --output export/tiny
    python tools/export_onnx.py --config-file configs/Base-RegionSpot-BB.yaml MODEL.WEIGHTS weights/regionspot_bb.pth \\
        --output export/bb
    # bake one vocabulary into head.onnx (no text_embeddings input, no text tower needed at run time):
    python tools/export_onnx.py --config-file ... --output export/bb-coco --bake-vocabulary "person,car,dog"

KEY VALUE config overrides may follow the config file. See docs/DEPLOY.md.
"""
import argparse
import json
import logging
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the graphs and manifest.json")
    p.add_argument("--bake-vocabulary", default=None, metavar="NAMES", help='comma-separated class names to bake in')
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return p


def main(argv=None):
    args = get_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from regionspot import RegionSpotPredictor
    from regionspot.config import get_regionspot_cfg
    from regionspot.export import export_model

    cfg = get_regionspot_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.REGIONSPOT.FROZEN.PRECISION = "fp32"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()  # no vocabulary is encoded for the export itself
    torch.manual_seed(0)
    predictor = RegionSpotPredictor(cfg)
    names = [n.strip() for n in args.bake_vocabulary.split(",") if n.strip()] if args.bake_vocabulary else None
    manifest = export_model(predictor, args.output, bake_vocabulary=names, opset=args.opset,
                            variant=os.path.basename(args.config_file))
    sizes = {f: os.path.getsize(os.path.join(args.output, f)) for f in manifest["graphs"].values()}
    print(json.dumps({"output": args.output, "bytes": sizes, "export_seconds": manifest["export_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
