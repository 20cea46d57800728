"""
Multi-dataset training: every batch comes from ONE of ``DATASETS.TRAIN`` and is classified against
that dataset's own vocabulary.

Data side, :func:`build_multi_dataset_train_loader`: one stock detectron2 train loader per dataset
(its dicts serialised by ``DatasetFromList``, its own ``TrainingSampler``), and an iterable that
picks, for each batch, a dataset at random with the weights ``DATALOADER.DATASET_RATIOS`` and
yields that loader's next batch. Each dict of the batch carries ``"vocabulary": <dataset name>``.

Model side, :func:`regionspot.engine.register_training_vocabularies`: the head gets each training
dataset's class names registered under the dataset's name, which is what a batch's ``"vocabulary"``
refers to.

Class names of COCO-json datasets (``register_coco_instances``) are only put into the metadata by
detectron2's loader when the dataset is loaded, which for Objects365 / V3Det / OpenImages means
parsing a json of gigabytes and building millions of dicts. The model needs the names earlier (it
is built before the loader), so :func:`dataset_class_names` reads just the ``"categories"`` array
of the json (:func:`read_coco_category_names`, a streaming scan that holds one chunk in memory)
and stores the names in the metadata exactly as ``load_coco_json`` will later (names ordered by
category id), so the later load agrees with them. Datasets without a json fall back to
``DatasetCatalog.get`` (which fills ``thing_classes`` for detectron2's COCO/LVIS loaders).
"""
import json
import logging
import math
import random
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHOICE_SEED",
    "MultiDatasetTrainLoader",
    "build_multi_dataset_train_loader",
    "dataset_choice_seed",
    "dataset_class_names",
    "dataset_ratios",
    "read_coco_categories",
    "read_coco_category_names",
]

# Seed of the dataset choice when cfg.SEED < 0 (the choice stays reproducible without a seed).
DEFAULT_CHOICE_SEED = 20231

_RATIOS_KEY = "DATALOADER.DATASET_RATIOS"


# ---------------------------------------------------------------------------------------------
# Data side
def dataset_ratios(dataset_names: Sequence[str], ratios: Sequence[float]) -> List[float]:
    """
    Sampling probabilities of ``dataset_names`` from ``DATALOADER.DATASET_RATIOS``: normalised to
    sum 1; empty means equal.

    Raises:
        ValueError: wrong length, or a weight that is not a positive finite number.
    """
    names = list(dataset_names)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: name at least one training dataset.")
    if len(ratios) == 0:
        return [1.0 / len(names)] * len(names)
    if len(ratios) != len(names):
        raise ValueError(
            f"{_RATIOS_KEY} has {len(ratios)} entries {list(ratios)} but DATASETS.TRAIN has "
            f"{len(names)} datasets {names}: give one weight per dataset, or none for equal weights."
        )
    weights = []
    for name, r in zip(names, ratios):
        try:
            w = float(r)
        except (TypeError, ValueError):
            w = float("nan")
        if not (math.isfinite(w) and w > 0):
            raise ValueError(
                f"{_RATIOS_KEY}={list(ratios)}: the weight {r!r} of dataset {name!r} is not a positive "
                f"number (datasets: {names})."
            )
        weights.append(w)
    total = sum(weights)
    return [w / total for w in weights]


def dataset_choice_seed(cfg_seed: int, rank: int) -> str:
    """
    Seed of the dataset choice of one rank: from ``cfg.SEED`` (``DEFAULT_CHOICE_SEED`` when < 0) and
    the rank, so ranks draw independently and every run with the same seed draws the same.
    """
    base = int(cfg_seed) if int(cfg_seed) >= 0 else DEFAULT_CHOICE_SEED
    # A string seed: deterministic across processes (not subject to hash randomisation).
    return f"regionspot-dataset-choice/{base}/{int(rank)}"


class _TagVocabulary:
    """Mapper wrapper that names the dataset (= the vocabulary) in every mapped dict."""

    def __init__(self, mapper: Callable, vocabulary: str):
        self.mapper = mapper
        self.vocabulary = vocabulary

    def __call__(self, dataset_dict):
        out = self.mapper(dataset_dict)
        if out is not None:  # None asks detectron2's MapDataset for another sample
            out["vocabulary"] = self.vocabulary
        return out


class MultiDatasetTrainLoader:
    """
    Infinite iterable of batches, each the next batch of one dataset's loader, the dataset drawn
    with ``probabilities`` from a ``random.Random(seed)``. A dataset's loader is only started
    (``iter``, which starts its workers) the first time it is drawn.

    Attributes:
        dataset_names, probabilities, loaders: one per dataset, in ``DATASETS.TRAIN`` order.
        seed: seed of the dataset choice.
    """

    def __init__(self, dataset_names: Sequence[str], loaders: Sequence, probabilities: Sequence[float], seed):
        assert len(dataset_names) == len(loaders) == len(probabilities) > 0
        self.dataset_names = list(dataset_names)
        self.loaders = list(loaders)
        self.probabilities = list(probabilities)
        self.seed = seed

    def __iter__(self) -> Iterator[list]:
        rng = random.Random(self.seed)
        iterators: Dict[int, Iterator] = {}
        indices = range(len(self.loaders))
        while True:
            i = rng.choices(indices, weights=self.probabilities)[0] if len(self.loaders) > 1 else 0
            it = iterators.get(i)
            if it is None:
                it = iterators[i] = iter(self.loaders[i])
            try:
                batch = next(it)
            except StopIteration:  # detectron2's samplers are infinite; restart a finite loader
                it = iterators[i] = iter(self.loaders[i])
                batch = next(it)
            yield batch


def _build_sampler(cfg, dataset_dicts, seed: Optional[int]):
    """The sampler ``DATALOADER.SAMPLER_TRAIN`` names, over one dataset."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN={name!r}: RegionSpot's train loader supports 'TrainingSampler' and "
        "'RepeatFactorTrainingSampler'."
    )


def build_multi_dataset_train_loader(cfg, mapper_factory: Callable[..., Callable]) -> MultiDatasetTrainLoader:
    """
    The training loader over ``cfg.DATASETS.TRAIN``: each batch from one dataset, drawn with the
    weights ``cfg.DATALOADER.DATASET_RATIOS`` (normalised; empty = equal), each of its dicts tagged
    ``"vocabulary": <dataset name>`` (also with a single dataset).

    Each dataset gets detectron2's stock train loader (``get_detection_dataset_dicts`` with
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, ``SOLVER.IMS_PER_BATCH`` over all ranks,
    ``DATALOADER.ASPECT_RATIO_GROUPING``, ``DATALOADER.NUM_WORKERS`` workers per dataset). Its dicts
    are serialised into one buffer by ``DatasetFromList`` and the list is dropped, so a dataset of
    millions of images is held once per rank, shared with its workers. The samplers are seeded from
    ``cfg.SEED`` (+ the dataset's index) when it is >= 0, else with detectron2's shared random seed;
    they shard each dataset over the ranks as usual.

    The dataset choice uses ``random.Random(dataset_choice_seed(cfg.SEED, rank))``: independent per
    rank, reproducible.

    Args:
        cfg: the config.
        mapper_factory: ``mapper_factory(cfg, dataset_name)`` -> the mapper of that dataset's dicts.

    Returns:
        :class:`MultiDatasetTrainLoader`, an infinite iterable of ``list[dict]`` batches.
    """
    names = list(cfg.DATASETS.TRAIN)
    # Checked before any dataset is loaded: a wrong config fails in a second, not after an hour.
    probabilities = dataset_ratios(names, cfg.DATALOADER.DATASET_RATIOS)
    loaders = []
    for idx, name in enumerate(names):
        dicts = get_detection_dataset_dicts([name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        if len(dicts) == 0:
            raise ValueError(f"Training dataset {name!r} has no images (after filtering images without annotations).")
        sampler = _build_sampler(cfg, dicts, None if cfg.SEED < 0 else cfg.SEED + idx)
        num_images = len(dicts)
        loaders.append(
            build_detection_train_loader(
                dataset=dicts,  # serialised by DatasetFromList inside; the list is released below
                mapper=_TagVocabulary(mapper_factory(cfg, name), name),
                sampler=sampler,
                total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                num_workers=cfg.DATALOADER.NUM_WORKERS,
            )
        )
        del dicts, sampler
        logger.info(f"Training dataset {name!r}: {num_images} images, drawn with probability {probabilities[idx]:.3f}")
    seed = dataset_choice_seed(cfg.SEED, comm.get_rank())
    return MultiDatasetTrainLoader(names, loaders, probabilities, seed)


# ---------------------------------------------------------------------------------------------
# Model side
_CATEGORIES_KEY = re.compile(r'"categories"\s*:\s*\[')


def read_coco_categories(
    json_file: str, chunk_size: int = 1 << 24, max_categories_chars: int = 1 << 28
) -> Optional[List[dict]]:
    """
    The ``"categories"`` array of a COCO-format json as stored, read without parsing the rest of the
    file: the file is scanned chunk by chunk for the array and only that array is decoded.

    Returns:
        the category dicts, or None when no well-formed, non-empty array with ``id`` and ``name``
        in every entry was found.
    """
    decoder = json.JSONDecoder()
    with PathManager.open(json_file, "r", encoding="utf-8") as f:
        buf = ""
        while True:
            chunk = f.read(chunk_size)
            buf += chunk
            m = _CATEGORIES_KEY.search(buf)
            if m:
                buf = buf[m.end() - 1 :]
                break
            if not chunk:
                return None
            buf = buf[-64:]  # the key may straddle two chunks
        while True:
            try:
                categories, _ = decoder.raw_decode(buf)
                break
            except json.JSONDecodeError:
                chunk = f.read(chunk_size)
                if not chunk or len(buf) > max_categories_chars:
                    return None
                buf += chunk
    if not isinstance(categories, list) or not categories:
        return None
    if not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
        return None
    return categories


def read_coco_category_names(json_file: str, chunk_size: int = 1 << 24, max_categories_chars: int = 1 << 28) -> Optional[List[str]]:
    """
    Class names of a COCO-format json as ``load_coco_json`` makes them (``name`` of each category,
    ordered by ``id``), from :func:`read_coco_categories`; None when the json has no usable
    ``"categories"`` array (the caller then loads the dataset the ordinary way).
    """
    categories = read_coco_categories(json_file, chunk_size, max_categories_chars)
    if categories is None:
        return None
    by_id = {c["id"]: c for c in categories}  # as pycocotools' index: the last entry of an id wins
    return [by_id[i]["name"] for i in sorted(by_id)]


def dataset_class_names(dataset_name: str) -> List[str]:
    """
    ``thing_classes`` of a registered dataset, made available before the dataset is loaded.

    When the metadata lacks them: read from the ``"categories"`` of its ``json_file`` (COCO-format
    datasets) and stored in the metadata, else the dataset is loaded with ``DatasetCatalog.get``
    (detectron2's COCO and LVIS loaders fill them).

    Raises:
        ValueError: the dataset is not registered or has no class names.
        FileNotFoundError: its ``json_file`` does not exist.
    """
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("thing_classes", None)
    if not classes:
        json_file = meta.get("json_file", None)
        if json_file:
            if not PathManager.isfile(json_file):
                raise FileNotFoundError(
                    f"Annotation file {json_file} of dataset {dataset_name!r} does not exist: check the "
                    "path it was registered with (the built-in datasets are read from "
                    "$DETECTRON2_DATASETS, laid out as regionspot/data/training_datasets.py and the "
                    "README describe)."
                )
            classes = read_coco_category_names(json_file)
            if classes:
                meta.thing_classes = classes  # load_coco_json sets the same list later
                logger.info(f"Read {len(classes)} class names of {dataset_name!r} from {json_file}")
        if not classes:
            if dataset_name not in DatasetCatalog.list():
                raise ValueError(
                    f"Dataset {dataset_name!r} is not registered in DatasetCatalog: register it first "
                    "(e.g. detectron2.data.datasets.register_coco_instances, or train_net.py "
                    "--coco-dataset NAME JSON IMAGE_ROOT)."
                )
            logger.info(f"Loading dataset {dataset_name!r} to learn its class names")
            DatasetCatalog.get(dataset_name)
            classes = meta.get("thing_classes", None)
    if not classes:
        raise ValueError(
            f"Dataset {dataset_name!r} has no thing_classes in its metadata (nor a COCO json with "
            "categories): its class names are the vocabulary it is classified against. "
            f"Set MetadataCatalog.get({dataset_name!r}).thing_classes."
        )
    return list(classes)
