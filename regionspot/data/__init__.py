"""Datasets of RegionSpot; importing this package registers them (detectron2 style)."""
from .lvis import LVIS_MINIVAL_NAME, patch_lvis_numpy, register_lvis_minival
from .lvis_vild import LVIS_V1_TRAIN_BASE, register_lvis_vild
from .odinw import register_odinw
from .mappers import (
    RegionSpotTestMapper,
    build_regionspot_test_loader,
    build_regionspot_test_mapper,
    build_regionspot_train_loader,
    build_regionspot_train_mapper,
)
from .proposals import detections_to_proposals, load_coco_detections, save_proposals
from .shapes import SHAPES_CLASSES, generate_shapes_split, register_shapes_datasets
from .training_datasets import register_training_datasets

# registers regionspot_shapes_train / regionspot_shapes_val (generated lazily on first use)
register_shapes_datasets()
# registers lvis_v1_minival (MDETR's LVIS v1 minival json, COCO images)
register_lvis_minival()
# registers objects365_v1_{train,val}, v3det_{train,val}, openimages_v6_{train,val} (COCO json, read lazily)
register_training_datasets()
# registers lvis_v1_train_base: LVIS v1 train without rare-class annotations (ViLD's base split)
register_lvis_vild()
# registers odinw13_<dataset>_{val,minival,test} (GLIP's ODinW release under $DETECTRON2_DATASETS/odinw/)
register_odinw()

__all__ = [
    "RegionSpotTestMapper",
    "build_regionspot_test_loader",
    "build_regionspot_test_mapper",
    "build_regionspot_train_loader",
    "build_regionspot_train_mapper",
    "detections_to_proposals",
    "load_coco_detections",
    "save_proposals",
    "LVIS_MINIVAL_NAME",
    "SHAPES_CLASSES",
    "generate_shapes_split",
    "patch_lvis_numpy",
    "register_lvis_minival",
    "register_odinw",
    "register_lvis_vild",
    "LVIS_V1_TRAIN_BASE",
    "register_shapes_datasets",
    "register_training_datasets",
]
