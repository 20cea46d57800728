"""
RegionSpot's detectron2 trainer (``train_net.py`` is its launcher): detectron2's ``DefaultTrainer``
with RegionSpot's loaders, optimizer, checkpointer, per-dataset training vocabularies and
evaluation, and :func:`evaluate_only`, what ``train_net.py --eval-only`` runs.
"""
import weakref

import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import verify_results

from ..checkpoint import RegionSpotCheckpointer, check_head_weights
from ..data import build_regionspot_train_loader
from ..data.multi_dataset import dataset_class_names
from ..evaluation import build_regionspot_evaluator, evaluate_datasets
from ..evaluation.evaluator import build_evaluation_loader
from ..modeling import load_head_weights
from ..solver import build_regionspot_optimizer
from .fingerprints import check_feature_cache
from .vocabularies import local_main_process_first, register_training_vocabularies

__all__ = ["Trainer", "build_train_loader", "check_amp_device", "evaluate_only"]


def build_train_loader(cfg):
    """
    The training loader (:func:`regionspot.data.build_regionspot_train_loader`): over the feature
    cache when ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR`` is set, after checking that it was made with
    the config's frozen models (:func:`regionspot.engine.check_feature_cache`), else over the images.
    """
    return build_regionspot_train_loader(cfg, check_cache=lambda cache: check_feature_cache(cache, cfg))


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
        return build_train_loader(cfg)

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
            "still run in reduced precision with MODEL.REGIONSPOT.FROZEN.PRECISION bf16."
        )


def evaluate_only(cfg, resume: bool = False):
    """
    Evaluate the model of ``cfg`` on DATASETS.TEST (what ``train_net.py --eval-only`` does): refuse
    a fusion module that nothing would load, build the model without training vocabularies, load
    ``MODEL.WEIGHTS`` (or OUTPUT_DIR's last checkpoint with ``resume``) and then
    ``MODEL.REGIONSPOT.HEAD.WEIGHTS``, check what was loaded, and evaluate.

    Returns:
        the results of :meth:`Trainer.test` (dataset name -> task -> metrics).
    """
    # A fusion module with random weights is evaluated only with MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM.
    check_head_weights(cfg, resume=resume)
    # Evaluation needs no training vocabularies (nor the training datasets' files).
    eval_cfg = cfg.clone()
    eval_cfg.defrost()
    eval_cfg.DATASETS.TRAIN = ()
    eval_cfg.freeze()
    model = Trainer.build_model(eval_cfg)
    RegionSpotCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    if cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS:  # MODEL.WEIGHTS was the detector's (GeneralizedRCNN recipes)
        load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS)
    check_head_weights(cfg, model)  # what the loaders actually loaded
    res = Trainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, res)
    return res
