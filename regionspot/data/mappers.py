"""Data loaders of RegionSpot, built from detectron2's ``DatasetMapper``."""
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.data import detection_utils as utils

__all__ = ["build_regionspot_test_mapper", "build_regionspot_test_loader", "build_regionspot_train_mapper",
           "build_regionspot_train_loader"]


def build_regionspot_test_mapper(cfg) -> DatasetMapper:
    """
    Test-time mapper: the image at its original size (SAM and CLIP make their own views with one
    resize) with its annotations kept (the GT-box protocol needs them; detectron2's default test
    mapper drops them) and precomputed proposals when ``MODEL.LOAD_PROPOSALS``.
    """
    return DatasetMapper(
        # is_train=True is what keeps annotations in DatasetMapper; no augmentation is applied.
        is_train=True,
        augmentations=[],
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=False,
        precomputed_proposal_topk=(
            cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST if cfg.MODEL.LOAD_PROPOSALS else None
        ),
    )


def build_regionspot_test_loader(cfg, dataset_name: str):
    """detectron2's test loader over ``dataset_name`` with :func:`build_regionspot_test_mapper`."""
    return build_detection_test_loader(cfg, dataset_name, mapper=build_regionspot_test_mapper(cfg))


def build_regionspot_train_mapper(cfg) -> DatasetMapper:
    """
    Training mapper: detectron2's augmentations from ``INPUT.*`` applied to the image and its boxes
    together, so SAM tokens are computed on the augmented image with the augmented boxes.
    """
    return DatasetMapper(
        is_train=True,
        augmentations=utils.build_augmentation(cfg, is_train=True),
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=False,
    )


def build_regionspot_train_loader(cfg):
    """
    The training loader ``train_net.py`` uses: from the feature cache when
    ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR`` is set, else over the images; several DATASETS.TRAIN
    are mixed batch by batch (see :mod:`regionspot.data.multi_dataset`).
    """
    if cfg.MODEL.REGIONSPOT.FEATURE_CACHE.DIR:
        from .feature_cache import build_cached_train_loader

        return build_cached_train_loader(cfg)
    from .multi_dataset import build_multi_dataset_train_loader

    return build_multi_dataset_train_loader(cfg, mapper_factory=lambda cfg, dataset_name: build_regionspot_train_mapper(cfg))
