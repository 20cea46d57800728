#!/usr/bin/env python
"""
Train or evaluate RegionSpot with detectron2's trainer.

    python train_net.py --config-file configs/RegionSpot-tiny_shapes.yaml
    python train_net.py --config-file configs/RegionSpot-BB_lvis-val_gt-boxes.yaml --eval-only \
        MODEL.WEIGHTS weights/regionspot_bb.pth
"""
import logging
import os
import weakref
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, verify_results

import regionspot  # noqa: F401  (registers the meta-architecture, head and datasets)
from regionspot import RegionSpotCheckpointer
from regionspot.config import get_regionspot_cfg
from regionspot.data import build_regionspot_test_loader, build_regionspot_train_loader
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
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "lvis":
            return LVISEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
            "RegionSpot evaluates 'lvis' and 'coco' datasets."
        )

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
        if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
            # A detector reads images resized as in its training (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST).
            return build_detection_test_loader(cfg, dataset_name)
        return build_regionspot_test_loader(cfg, dataset_name)

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
        """Evaluate on each of DATASETS.TEST with that dataset's class names as the vocabulary."""
        head = (model.module if hasattr(model, "module") else model).roi_heads
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            if cfg.MODEL.REGIONSPOT.VOCABULARY == "dataset":
                head.set_vocabulary(MetadataCatalog.get(name).thing_classes)
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            if cfg.MODEL.LOAD_PROPOSALS:
                one.DATASETS.PROPOSAL_FILES_TEST = (cfg.DATASETS.PROPOSAL_FILES_TEST[idx],)
            one.freeze()
            results[name] = super().test(one, model, None if evaluators is None else [evaluators[idx]])
        return results


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
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        # Evaluation needs no training vocabularies (nor the training datasets' files).
        eval_cfg = cfg.clone()
        eval_cfg.defrost()
        eval_cfg.DATASETS.TRAIN = ()
        eval_cfg.freeze()
        model = Trainer.build_model(eval_cfg)
        RegionSpotCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if cfg.MODEL.REGIONSPOT.HEAD_WEIGHTS:  # MODEL.WEIGHTS was the detector's (GeneralizedRCNN recipes)
            load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD_WEIGHTS)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
