"""Data loaders of RegionSpot, built from detectron2's ``DatasetMapper``."""
import copy
import logging
import os
from typing import Tuple

import numpy as np
import torch

from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from .images import ImageReadError, read_image

logger = logging.getLogger(__name__)

__all__ = ["RegionSpotTestMapper", "RegionSpotTrainMapper", "box_scale_factors", "read_dataset_image", "build_regionspot_test_mapper", "build_regionspot_test_loader", "build_regionspot_train_mapper",
           "build_regionspot_train_loader"]


BOX_RESCALE_MODES = ("authors", "fixed")
PROPOSAL_MODES = ("as_given", "detectron2")


def box_scale_factors(original_size, resized_size, mode: str) -> Tuple[float, float]:
    """
    (x, y) factors that bring boxes from the original image into the resized one.

    Args:
        original_size, resized_size: (height, width).
        mode: "fixed" (x by the width ratio, y by the height ratio) or "authors" (x by the height
            ratio, y by the width ratio, as the authors' evaluation helper does: equal up to the
            rounding of the resized size, so up to ~0.3 px off).
    """
    (h0, w0), (h1, w1) = original_size, resized_size
    if mode == "fixed":
        return w1 / w0, h1 / h0
    if mode == "authors":
        return h1 / h0, w1 / w0
    raise ValueError(f"MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE={mode!r}: use one of {BOX_RESCALE_MODES}.")


def read_dataset_image(dataset_dict: dict, image_format: str, stage: str) -> np.ndarray:
    """
    The image of a dataset dict, read by :func:`regionspot.data.images.read_image`.

    Args:
        dataset_dict: detectron2 dataset dict with ``file_name`` (and ``image_id``).
        image_format: ``INPUT.FORMAT``.
        stage: "evaluation" or "training", for the message.

    Raises:
        ImageReadError: naming the file and the image id, with the fix. The image is not skipped:
            a skipped image would silently change the AP (evaluation) or the data (training).
    """
    try:
        return read_image(dataset_dict["file_name"], format=image_format)
    except ImageReadError as e:
        image_id = dataset_dict.get("image_id", "?")
        repair = "Correct its file_name or restore the file" if e.reason == "missing" else "Replace the file with a good copy"
        effect = "the AP" if stage == "evaluation" else "the training data"
        raise e.with_context(
            f"image_id {image_id!r} of the dataset",
            f"{repair}, or remove image {image_id!r} from the dataset json; {stage} stops here instead of "
            f"skipping it, because a skipped image would silently change {effect}",
        ) from e


class RegionSpotTestMapper(DatasetMapper):
    """
    Test-time mapper of the ``RegionSpot`` meta-architecture.

    The image is resized as by detectron2's default test mapper (``ResizeShortestEdge(MIN_SIZE_TEST,
    MAX_SIZE_TEST)``, PIL bilinear on uint8; ``MIN_SIZE_TEST`` 0 keeps the original size); SAM and
    CLIP then make their views from that image. GT boxes (annotations are kept: the GT-box
    protocol needs them; detectron2's test mapper drops them) and precomputed proposals are scaled
    into the resized frame with ``MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE``; proposals are used as
    given or the detectron2 way (``PROTOCOL.PROPOSALS``). ``height``/``width`` stay the original
    size, to which the model brings its results back.
    """

    def __init__(self, *, box_rescale: str = "fixed", proposals: str = "as_given", **kwargs):
        """
        Args:
            box_rescale: see :func:`box_scale_factors`.
            proposals: "as_given" (every box of the file, unclipped, uncapped) or "detectron2"
                (clipped, empty ones dropped, the first ``precomputed_proposal_topk`` kept).
            kwargs: of ``DatasetMapper``.
        """
        super().__init__(**kwargs)
        if box_rescale not in BOX_RESCALE_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE={box_rescale!r}: use one of {BOX_RESCALE_MODES}.")
        if proposals not in PROPOSAL_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.PROTOCOL.PROPOSALS={proposals!r}: use one of {PROPOSAL_MODES}.")
        self.box_rescale = box_rescale
        self.proposals_mode = proposals

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image = read_dataset_image(d, self.image_format, "evaluation")
        utils.check_image_size(d, image)
        original_size = tuple(image.shape[:2])
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_size = tuple(image.shape[:2])
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        d.setdefault("height", original_size[0])
        d.setdefault("width", original_size[1])
        scale = np.array(box_scale_factors(original_size, image_size, self.box_rescale) * 2, dtype=np.float64)

        if self.proposal_topk is not None and "proposal_boxes" in d:
            if self.proposals_mode == "detectron2":
                utils.transform_proposals(d, image_size, transforms, proposal_topk=self.proposal_topk)
            else:
                boxes = BoxMode.convert(
                    np.asarray(d.pop("proposal_boxes"), dtype=np.float64).reshape(-1, 4),
                    d.pop("proposal_bbox_mode"),
                    BoxMode.XYXY_ABS,
                )
                proposals = Instances(image_size)
                proposals.proposal_boxes = Boxes(torch.as_tensor(boxes * scale, dtype=torch.float32))
                proposals.objectness_logits = torch.as_tensor(
                    np.asarray(d.pop("proposal_objectness_logits"), dtype=np.float32)
                )
                d["proposals"] = proposals

        if "annotations" in d:
            annos = []
            for obj in d.pop("annotations"):
                if obj.get("iscrowd", 0):
                    continue
                obj = {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")}
                box = BoxMode.convert(obj["bbox"], obj["bbox_mode"], BoxMode.XYXY_ABS)
                box = np.asarray(box, dtype=np.float64) * scale
                # As detectron2 transforms annotations: clipped at the image's far edges.
                obj["bbox"] = np.minimum(box, [image_size[1], image_size[0]] * 2)
                obj["bbox_mode"] = BoxMode.XYXY_ABS
                annos.append(obj)
            instances = utils.annotations_to_instances(annos, image_size)
            d["instances"] = utils.filter_empty_instances(instances)
        return d


def build_regionspot_test_mapper(cfg) -> RegionSpotTestMapper:
    """
    The :class:`RegionSpotTestMapper` of ``cfg``: ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``
    (0: original size), ``MODEL.REGIONSPOT.PROTOCOL.*`` and precomputed proposals when
    ``MODEL.LOAD_PROPOSALS``.
    """
    min_size, max_size = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    if min_size < 0:
        raise ValueError(f"INPUT.MIN_SIZE_TEST={min_size}: use 0 (original size) or a short-side length such as 800.")
    augmentations = [T.ResizeShortestEdge(min_size, max_size, "choice")] if min_size > 0 else []
    return RegionSpotTestMapper(
        # is_train=True is what keeps annotations in DatasetMapper; the augmentations are the above.
        is_train=True,
        augmentations=augmentations,
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=False,
        precomputed_proposal_topk=(
            cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST if cfg.MODEL.LOAD_PROPOSALS else None
        ),
        box_rescale=cfg.MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE,
        proposals=cfg.MODEL.REGIONSPOT.PROTOCOL.PROPOSALS,
    )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def evaluation_loader_workers(num_workers: int) -> int:
    """
    Worker processes of the test loader: ``DATALOADER.NUM_WORKERS``, at most :func:`usable_cpus`.

    A test image costs the loader ~15 ms (read, decode, resize to 800 px) against seconds of the
    model on a CPU and ~0.1 s on a GPU, so one or two workers keep the next images ready; workers
    beyond the CPUs cannot add any and each is one more process holding the parent's memory
    (torch's DataLoader warns about it).
    """
    num_workers = int(num_workers)
    if num_workers < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS={num_workers}: use 0 (load in the main process) or more.")
    return min(num_workers, usable_cpus())


def build_regionspot_test_loader(cfg, dataset_name: str):
    """
    detectron2's test loader over ``dataset_name`` with :func:`build_regionspot_test_mapper`, its
    worker processes as :func:`evaluation_loader_workers` says. Workers decode and map the next images
    (two each ahead) while the model runs; the order of the images is the sampler's whatever the
    number of workers, so the results do not depend on it.
    """
    num_workers = evaluation_loader_workers(cfg.DATALOADER.NUM_WORKERS)
    if num_workers != cfg.DATALOADER.NUM_WORKERS:
        logger.info(
            f"Test loader of {dataset_name!r}: {num_workers} worker processes (DATALOADER.NUM_WORKERS="
            f"{cfg.DATALOADER.NUM_WORKERS}, {usable_cpus()} usable CPUs)."
        )
    return build_detection_test_loader(
        cfg, dataset_name, mapper=build_regionspot_test_mapper(cfg), num_workers=num_workers
    )


class RegionSpotTrainMapper(DatasetMapper):
    """
    detectron2's ``DatasetMapper`` whose image is read by :func:`read_dataset_image` (16-bit images
    brought to 8 bits, an unreadable file named with its image id); everything after the read is
    detectron2's ``DatasetMapper.__call__`` unchanged.
    """

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_dataset_image(dataset_dict, self.image_format, "training")
        utils.check_image_size(dataset_dict, image)
        # From here on as detectron2's DatasetMapper.__call__ (v0.6 / main): boxes are untouched by this class.
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def build_regionspot_train_mapper(cfg) -> DatasetMapper:
    """
    Training mapper: detectron2's augmentations from ``INPUT.*`` applied to the image and its boxes
    together, so SAM tokens are computed on the augmented image with the augmented boxes.
    """
    return RegionSpotTrainMapper(
        is_train=True,
        augmentations=utils.build_augmentation(cfg, is_train=True),
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=False,
    )


def build_regionspot_train_loader(cfg, check_cache=None):
    """
    The training loader: from the feature cache when ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR`` is set,
    else over the images; several DATASETS.TRAIN are mixed batch by batch (see
    :mod:`regionspot.data.multi_dataset`). ``train_net.py`` uses it through
    :func:`regionspot.engine.build_train_loader`, which passes the check of the cache.

    Args:
        check_cache: with a feature cache, called with the
            :class:`~regionspot.data.feature_cache.FeatureCache` before anything is read; raises
            when the cache does not fit the config's frozen models (required then: this package
            builds no model to compare with).
    """
    if cfg.MODEL.REGIONSPOT.FEATURE_CACHE.DIR:
        from .feature_cache import build_cached_train_loader

        if check_cache is None:
            raise ValueError(
                "MODEL.REGIONSPOT.FEATURE_CACHE.DIR is set: the cache must be checked against the config's frozen "
                "models before training from it. Build the loader with regionspot.engine.build_train_loader(cfg) "
                "(or pass check_cache)."
            )
        return build_cached_train_loader(cfg, check_cache)
    from .multi_dataset import build_multi_dataset_train_loader

    return build_multi_dataset_train_loader(cfg, mapper_factory=lambda cfg, dataset_name: build_regionspot_train_mapper(cfg))
