#!/usr/bin/env python
"""
Train or evaluate RegionSpot with detectron2's trainer (:class:`regionspot.engine.Trainer`).

    python train_net.py --config-file configs/Quickstart/RegionSpot-tiny_shapes.yaml
    python train_net.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_gt-boxes.yaml --eval-only \
        MODEL.WEIGHTS weights/regionspot_bb.pth
    # your own COCO-format data
    python train_net.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_gt-boxes.yaml \
        --coco-dataset my_train train.json images/ --coco-dataset my_val val.json images/ \
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"
"""
import functools
import logging

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils.logger import setup_logger

from regionspot.config import get_regionspot_cfg
from regionspot.data.checks import check_run_inputs
from regionspot.data.user_datasets import add_dataset_arguments, register_coco_datasets
from regionspot.engine import Trainer, evaluate_only, run_then_close


def setup(args):
    cfg = get_regionspot_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # RegionSpot's own messages (protocol cards, vocabulary, cache) go to the console and log.txt too.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="regionspot")
    return cfg


def main(args):
    # Registered in every process launch starts (detectron2's registries are per process).
    register_coco_datasets(getattr(args, "coco_dataset", []))
    cfg = setup(args)
    # Wrong paths, unregistered datasets and proposal files of another dataset are reported now,
    # not after the model is built and the vocabulary encoded.
    check_run_inputs(cfg, eval_only=args.eval_only)
    if args.eval_only:
        return evaluate_only(cfg, resume=args.resume)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = add_dataset_arguments(default_argument_parser()).parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(functools.partial(run_then_close, main), args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
