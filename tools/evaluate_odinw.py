#!/usr/bin/env python
"""
Evaluate RegionSpot on ODinW-13 (GLIP's 13 "Object Detection in the Wild" datasets) and print the
box AP of each dataset and their average::

    python tools/evaluate_odinw.py --config-file configs/ODinW/RegionSpot-BB_odinw13_gt-boxes.yaml \\
        MODEL.WEIGHTS weights/regionspot_bb.pth
    # boxes of a detector: one proposal file per dataset, <dir>/<dataset name>.pkl
    # (tools/convert_detections_to_proposals.py --dataset odinw13_Aquarium_val ...)
    python tools/evaluate_odinw.py --config-file configs/ODinW/RegionSpot-BB_odinw13_gt-boxes.yaml \\
        --proposals-dir proposals/odinw13_glip_t MODEL.WEIGHTS weights/regionspot_bb.pth

Datasets are read from ``$DETECTRON2_DATASETS/odinw/`` (or ``--datasets-root``) in the layout of
GLIP's ODinW release (see ``regionspot/data/odinw.py``); those not there are skipped with one line
each. Each dataset is classified against its own class names, and evaluated with detectron2's
``COCOEvaluator`` (box AP, AP@[.5:.95], 100 detections per image). The split is the one GLIP
evaluates (``val``; ``minival`` for EgoHands and VehiclesOpenImages) unless ``--split`` says
otherwise. The table is printed at the end and written, with the box source and the paths, to
``OUTPUT_DIR/odinw13_summary.json``; protocol cards go to ``OUTPUT_DIR/protocol_card.json``.

Config overrides follow the options as KEY VALUE pairs (optionally after ``--``), as in
``train_net.py``; ``--num-gpus`` shards the images over processes with detectron2's ``launch``.
"""
import json
import logging
import math
import os
import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model

import regionspot  # noqa: F401  (registers the meta-architecture, head and datasets)
from regionspot import RegionSpotCheckpointer
from regionspot.checkpoint import check_head_weights
from regionspot.config import get_regionspot_cfg
from regionspot.data.atomic_files import atomic_write_bytes
from regionspot.engine import local_main_process_first
from regionspot.data.odinw import (
    BENCHMARK_SPLIT,
    ODINW13_DATASETS,
    missing_odinw_datasets,
    odinw_dataset_name,
    odinw_paths,
    odinw_root,
    register_odinw,
    resolve_odinw_names,
)
from regionspot.evaluation.evaluator import evaluate_datasets
from regionspot.modeling import load_head_weights

logger = logging.getLogger("regionspot.evaluate_odinw")

SUMMARY_FILE = "odinw13_summary.json"
SPLITS = (BENCHMARK_SPLIT, "val", "test")


def get_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--datasets", default="", metavar="A,B",
        help=f"comma-separated ODinW-13 datasets (any case) to evaluate; default all: {','.join(ODINW13_DATASETS)}",
    )
    parser.add_argument(
        "--split", default=BENCHMARK_SPLIT, choices=SPLITS,
        help="benchmark: the split GLIP evaluates (val; minival for EgoHands and VehiclesOpenImages)",
    )
    parser.add_argument(
        "--datasets-root", default=None, metavar="DIR",
        help="folder that holds odinw/ (default $DETECTRON2_DATASETS or 'datasets')",
    )
    parser.add_argument(
        "--proposals-dir", default=None, metavar="DIR",
        help="classify a detector's boxes: DIR/<dataset name>.pkl per dataset (detectron2 proposal files)",
    )
    return parser


def config_opts(args):
    """KEY VALUE overrides of the command line (a leading '--' separator is dropped)."""
    opts = list(args.opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    return opts


def plan(args):
    """
    The datasets to evaluate: a list of ``(short name, dataset name, proposal file or None)``, and
    ``{short name: why skipped}``. Registers the ODinW datasets under ``--datasets-root``.
    """
    shorts = list(ODINW13_DATASETS)
    if args.datasets:
        try:
            shorts = resolve_odinw_names([n for n in args.datasets.split(",") if n.strip()])
        except ValueError as e:
            raise SystemExit(f"--datasets: {e}")
    register_odinw(args.datasets_root)
    skipped = missing_odinw_datasets(args.datasets_root, args.split, shorts)
    entries = []
    for short in shorts:
        if short in skipped:
            continue
        name = odinw_dataset_name(short, args.split)
        proposal_file = None
        if args.proposals_dir:
            proposal_file = os.path.join(args.proposals_dir, f"{name}.pkl")
            if not os.path.isfile(proposal_file):
                skipped[short] = f"proposal file not found: {proposal_file}"
                continue
        entries.append((short, name, proposal_file))
    return entries, skipped


def check_config(args):
    """Refuse settings ODinW cannot be evaluated with, before any process starts."""
    cfg = get_regionspot_cfg(args.config_file, config_opts(args))
    if cfg.MODEL.REGIONSPOT.EVAL.AP_KIND != "standard":
        raise SystemExit(
            f"MODEL.REGIONSPOT.EVAL.AP_KIND={cfg.MODEL.REGIONSPOT.EVAL.AP_KIND!r}: ODinW is evaluated with COCO "
            "box AP; set it to 'standard'."
        )
    if cfg.MODEL.REGIONSPOT.BOX_SOURCE == "PROPOSALS" and not args.proposals_dir:
        raise SystemExit(
            "The config asks for BOX_SOURCE PROPOSALS: give --proposals-dir DIR with one <dataset name>.pkl per "
            "ODinW dataset (e.g. DIR/odinw13_Aquarium_val.pkl), or use MODEL.REGIONSPOT.BOX_SOURCE GT."
        )


def setup(args, entries):
    """The evaluation config: the given recipe with DATASETS.TEST = the datasets found."""
    cfg = get_regionspot_cfg(args.config_file, config_opts(args))
    cfg.DATASETS.TRAIN = ()  # evaluation needs no training vocabularies (nor their files)
    cfg.DATASETS.TEST = tuple(name for _, name, _ in entries)
    if args.proposals_dir:
        cfg.MODEL.LOAD_PROPOSALS = True
        cfg.MODEL.REGIONSPOT.BOX_SOURCE = "PROPOSALS"
        cfg.DATASETS.PROPOSAL_FILES_TEST = tuple(f for _, _, f in entries)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def describe_box_source(cfg) -> str:
    """Where the region prompts come from, in one line."""
    rs = cfg.MODEL.REGIONSPOT
    if cfg.MODEL.META_ARCHITECTURE != "RegionSpot":
        return f"{cfg.MODEL.META_ARCHITECTURE} (its own boxes; see the protocol card)"
    if rs.BOX_SOURCE == "GT":
        return "GT (the annotated boxes are the prompts)"
    if rs.BOX_SOURCE == "PROPOSALS":
        folder = os.path.dirname(cfg.DATASETS.PROPOSAL_FILES_TEST[0]) if cfg.DATASETS.PROPOSAL_FILES_TEST else "?"
        scores = "box score x class probability" if rs.SCORE.USE_BOX_SCORES else "box scores ignored"
        return f"proposal files {folder}/<dataset name>.pkl ({scores})"
    return f"proposal generator {cfg.MODEL.PROPOSAL_GENERATOR.NAME}"


def summarize(cfg, args, entries, skipped, results):
    """The summary dict: per-dataset COCO box AP and their mean over the datasets evaluated."""
    from detectron2.data import MetadataCatalog

    rows = []
    for short, name, proposal_file in entries:
        bbox = results.get(name, {}).get("bbox", {})
        meta = MetadataCatalog.get(name)
        rows.append({
            "dataset": short,
            "name": name,
            "split": meta.get("odinw_split", None),
            "json_file": meta.get("json_file", None),
            "proposal_file": proposal_file,
            "num_classes": len(meta.get("thing_classes", []) or []),
            "AP": bbox.get("AP"),
            "AP50": bbox.get("AP50"),
            "AP75": bbox.get("AP75"),
        })
    finite = [r["AP"] for r in rows if r["AP"] is not None and math.isfinite(r["AP"])]
    return {
        "benchmark": "ODinW-13",
        "metric": "COCO box AP@[.5:.95] (detectron2 COCOEvaluator, 100 detections per image)",
        "split": args.split,
        "box_source": describe_box_source(cfg),
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "datasets_root": odinw_root(args.datasets_root),
        "datasets": rows,
        "average_AP": sum(finite) / len(finite) if finite else None,
        "num_averaged": len(finite),
        "num_benchmark_datasets": len(ODINW13_DATASETS),
        "skipped": [{"dataset": short, "reason": why} for short, why in skipped.items()],
        "protocol_cards": os.path.join(cfg.OUTPUT_DIR, "protocol_card.json"),
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(summary) -> str:
    """The printed table: one row per dataset, then the average."""
    lines = [
        f"ODinW-13 box AP (COCO AP@[.5:.95]), split: {summary['split']}, box source: {summary['box_source']}",
        f"{'dataset':<24}{'split':<9}{'classes':>8}{'AP':>9}{'AP50':>9}",
    ]
    for r in summary["datasets"]:
        lines.append(f"{r['dataset']:<24}{r['split']:<9}{r['num_classes']:>8}{_fmt(r['AP']):>9}{_fmt(r['AP50']):>9}")
    label = f"average ({summary['num_averaged']} of {summary['num_benchmark_datasets']})"
    lines.append(f"{label:<41}{_fmt(summary['average_AP']):>9}")
    return "\n".join(lines)


def main(args, entries, skipped):
    register_odinw(args.datasets_root)  # in each process launch starts
    cfg = setup(args, entries)
    if comm.is_main_process():
        print(f"Box source: {describe_box_source(cfg)}", flush=True)
    check_head_weights(cfg, resume=args.resume)  # before the model is built and the vocabularies encoded
    with local_main_process_first():  # text embeddings encoded once per machine, into the cache
        model = build_model(cfg)
    RegionSpotCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    if cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS:  # MODEL.WEIGHTS was a detector's (GeneralizedRCNN recipes)
        load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS)
    check_head_weights(cfg, model)
    names = list(cfg.DATASETS.TEST)
    # Box AP only: ODinW has no instance masks (Roboflow's segmentation fields are empty or boxes).
    evaluators = [
        COCOEvaluator(name, tasks=("bbox",), output_dir=os.path.join(cfg.OUTPUT_DIR, "inference", name))
        for name in names
    ]
    results = evaluate_datasets(cfg, model, evaluators=evaluators, dataset_names=names)
    if comm.is_main_process():
        summary = summarize(cfg, args, entries, skipped, results)
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        path = os.path.join(cfg.OUTPUT_DIR, SUMMARY_FILE)
        atomic_write_bytes(path, json.dumps(summary, indent=2).encode("utf-8"))
        print(format_table(summary), flush=True)
        print(f"Summary written to {path}", flush=True)
    return results


def run(argv=None) -> int:
    """Parse, find the datasets, evaluate; the exit status."""
    args = get_parser().parse_args(argv)
    check_config(args)
    entries, skipped = plan(args)
    for short, why in skipped.items():
        print(f"Skipping ODinW dataset {short}: {why}", flush=True)
    if not entries:
        root = os.path.join(odinw_root(args.datasets_root), "odinw")
        example = odinw_paths(next(iter(ODINW13_DATASETS)), args.split, args.datasets_root)[1]
        print(
            f"No ODinW-13 dataset to evaluate under {root}. Put GLIP's ODinW release there (GLIP's "
            f"odinw/download.py unpacks it as odinw/<Dataset>/..., e.g. {example}; layout in "
            "regionspot/data/odinw.py), or point --datasets-root / $DETECTRON2_DATASETS at the folder that "
            "holds odinw/.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    from functools import partial

    from regionspot.engine import run_then_close

    launch(
        partial(run_then_close, main), args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args, entries, skipped),
    )
    return 0


if __name__ == "__main__":
    sys.exit(run())
