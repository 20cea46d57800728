#!/usr/bin/env python
"""
Train or evaluate RegionSpot with detectron2's trainer.

    python train_net.py --config-file configs/Quickstart/RegionSpot-tiny_shapes.yaml
    python train_net.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_gt-boxes.yaml --eval-only \
        MODEL.WEIGHTS weights/regionspot_bb.pth
    # your own COCO-format data
    python train_net.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_gt-boxes.yaml \
        --coco-dataset my_train train.json images/ --coco-dataset my_val val.json images/ \
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"
"""
import logging
import weakref

import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

import regionspot  # noqa: F401  (registers the meta-architecture, head and datasets)
from regionspot import RegionSpotCheckpointer
from regionspot.checkpoint import check_head_weights
from regionspot.config import get_regionspot_cfg
from regionspot.data import build_regionspot_train_loader
from regionspot.data.checks import check_run_inputs
from regionspot.data.user_datasets import add_dataset_arguments, register_coco_datasets
from regionspot.evaluation import build_regionspot_evaluator, evaluate_datasets
from regionspot.evaluation.evaluator import build_evaluation_loader
from regionspot.modeling import load_head_weights
from regionspot.data.multi_dataset import dataset_class_names, local_main_process_first, register_training_vocabularies
from regionspot.solver import build_regionspot_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with RegionSpot's loaders, optimizer, checkpointer and per-dataset vocabulary."""

    def __init__(self, cfg):
        check_amp_device(cfg)
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_regionspot_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_model(cls, cfg):
        """
        The model, with each of DATASETS.TRAIN's class names registered as the named vocabulary its
        batches use. Text is encoded once per machine (local main process first, into the cache).
        """
        with local_main_process_first():
            for name in cfg.DATASETS.TRAIN:  # the head may read thing_classes of DATASETS.TRAIN[0]
                dataset_class_names(name)
            model = super().build_model(cfg)
        if cfg.DATASETS.TRAIN:
            register_training_vocabularies(model, cfg.DATASETS.TRAIN)
        return model

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_evaluation_loader(cfg, dataset_name)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_regionspot_train_loader(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_regionspot_optimizer(cfg, model)

    def build_hooks(self):
        # Called by DefaultTrainer.__init__ before its hooks take the checkpointer.
        self.checkpointer = RegionSpotCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        Evaluate on each of DATASETS.TEST with that dataset's class names as the vocabulary, and
        write a protocol card of each result beside metrics.json.
        """
        return evaluate_datasets(cfg, model, evaluators)


def check_amp_device(cfg):
    """detectron2's AMPTrainer (SOLVER.AMP.ENABLED) runs on CUDA only: refuse it up front elsewhere."""
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ValueError(
            f"SOLVER.AMP.ENABLED=True needs a CUDA device (detectron2's AMPTrainer is CUDA-only), but "
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r}. Set SOLVER.AMP.ENABLED False; the frozen SAM and CLIP can "
            "still run in reduced precision with MODEL.REGIONSPOT.FROZEN_PRECISION bf16."
        )


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
        # A fusion module with random weights is evaluated only with MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD.
        check_head_weights(cfg, resume=args.resume)
        # Evaluation needs no training vocabularies (nor the training datasets' files).
        eval_cfg = cfg.clone()
        eval_cfg.defrost()
        eval_cfg.DATASETS.TRAIN = ()
        eval_cfg.freeze()
        model = Trainer.build_model(eval_cfg)
        RegionSpotCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if cfg.MODEL.REGIONSPOT.HEAD_WEIGHTS:  # MODEL.WEIGHTS was the detector's (GeneralizedRCNN recipes)
            load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD_WEIGHTS)
        check_head_weights(cfg, model)  # what the loaders actually loaded
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = add_dataset_arguments(default_argument_parser()).parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
