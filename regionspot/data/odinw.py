"""
ODinW-13: the 13 "Object Detection in the Wild" datasets on which GLIP (Li et al., CVPR 2022) reports
zero-shot detection, registered as COCO-format detectron2 datasets under ``$DETECTRON2_DATASETS``
(default ``datasets``), in the layout of the public release that GLIP's ``odinw/download.py``
unpacks and GLIP's ``configs/odinw_13/*.yaml`` read::

    $DETECTRON2_DATASETS/odinw/
      AerialMaritimeDrone/large/{valid,test}/
      Aquarium/Aquarium Combined.v2-raw-1024.coco/{valid,test}/
      CottontailRabbits/{valid,test}/
      EgoHands/generic/{mini_val,valid,test}/
      NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco/{valid,test}/
      Packages/Raw/{valid,test}/
      PascalVOC/valid/                          # no test split (GLIP's "test" entry reads valid/)
      pistols/export/                           # images, and {val,test}_annotations_without_background.json
      pothole/{valid,test}/
      Raccoon/Raccoon.v2-raw.coco/{valid,test}/
      ShellfishOpenImages/raw/{valid,test}/
      thermalDogsAndPeople/{valid,test}/
      VehiclesOpenImages/416x416/{mini_val,valid,test}/

Each split folder holds its images and ``annotations_without_background.json`` (pistols keeps one
folder for all splits and names the json after the split). These jsons are the Roboflow COCO exports
with the dataset-level placeholder category (id 0, named after the dataset's supercategory, e.g.
"movable-objects") removed, so their categories are the real class names.

Registered names are ``odinw13_<dataset>_<split>`` with ``<dataset>`` the short names of
:data:`ODINW13_DATASETS` (the top-level folder names, as GLIP spells them) and ``<split>`` one of:

- ``val``: ``valid/``, every dataset;
- ``minival``: ``mini_val/``, EgoHands and VehiclesOpenImages only;
- ``test``: ``test/`` (PascalVOC: ``valid/``, as GLIP's config has it).

**Which split is ODinW-13.** GLIP's zero-shot ODinW evaluation (``tools/test_grounding_net.py
--task_config configs/odinw_13/<dataset>.yaml``) evaluates each config's ``DATASETS.TEST``, which
is ``("val",)`` for 11 datasets and ``("minival",)`` for EgoHands and VehiclesOpenImages. So the
benchmark split (:data:`ODINW13_BENCHMARK_SPLIT`, and the entries
of :data:`ODINW13_DATASETS`) is ``val`` except those two, ``minival``. Numbers compared with GLIP's
ODinW table are on that split; the ``test`` split is registered for other uses.

Each dataset's vocabulary is its own category names (``thing_classes``, ordered by category id),
set in the metadata when the dataset is registered by reading only the ``"categories"`` of its
json. A json that is not there yet registers without ``thing_classes``; they are filled when
:func:`register_odinw` runs again after the files have arrived (``tools/evaluate_odinw.py`` calls
it) or when the dataset is loaded.

A raw Roboflow export (``_annotations.coco.json``) still has the placeholder category (id 0,
supercategory "none"). It is not a class (GLIP's loader skips id 0 and ``__background__``), but
detectron2's ``load_coco_json`` would make it one and its ``COCOEvaluator`` needs the json's
categories to be the classes, so a json with such a category is refused with a message saying so
(and reported as unusable by :func:`missing_odinw_datasets`).

Roboflow exports also number annotations from 0. COCO evaluation (pycocotools' ``COCOeval`` and
detectron2's fast version alike) records a match by the ground truth's id, so a box with id 0 is
never counted as detected. GLIP evaluates these jsons with pycocotools' ``COCOeval`` too, so its
ODinW numbers carry the same effect; this module leaves the jsons as they are (AP is computed as
GLIP computed it) and logs it when a loaded json has an annotation with id 0.
"""
import functools
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils.file_io import PathManager

from .multi_dataset import read_coco_categories

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARK_SPLIT",
    "ODINW13_BENCHMARK_SPLIT",
    "ODINW13_CLASS_NAMES",
    "ODINW13_DATASETS",
    "ODINW13_SPLITS",
    "ODINW_PREFIX",
    "available_odinw_datasets",
    "load_odinw_json",
    "missing_odinw_datasets",
    "odinw_dataset_name",
    "odinw_paths",
    "odinw_root",
    "odinw_vocabulary",
    "read_coco_categories",
    "register_odinw",
    "resolve_odinw_names",
]

ODINW_PREFIX = "odinw13"
# Pseudo-split meaning "the split GLIP evaluates this dataset on" (see the module docstring).
BENCHMARK_SPLIT = "benchmark"

# Roboflow split folder of each registered split.
_SPLIT_FOLDERS = {"val": "valid", "minival": "mini_val", "test": "test"}
_JSON = "annotations_without_background.json"


def _roboflow_splits(folder: str, splits: Sequence[str] = ("val", "test")) -> Dict[str, Tuple[str, str]]:
    # One sub-folder per split holding the images and the json.
    out = {}
    for split in splits:
        image_root = f"{folder}/{_SPLIT_FOLDERS[split]}"
        out[split] = (image_root, f"{image_root}/{_JSON}")
    return out


# short name -> {split: (image root, json file)}, relative to the datasets root. Paths as in GLIP's
# configs/odinw_13/*.yaml (DATASETS.REGISTER), in the order of that folder.
ODINW13_SPLITS: "OrderedDict[str, Dict[str, Tuple[str, str]]]" = OrderedDict(
    [
        ("AerialMaritimeDrone", _roboflow_splits("odinw/AerialMaritimeDrone/large")),
        ("Aquarium", _roboflow_splits("odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco")),
        ("CottontailRabbits", _roboflow_splits("odinw/CottontailRabbits")),
        ("EgoHands", _roboflow_splits("odinw/EgoHands/generic", ("val", "minival", "test"))),
        (
            "NorthAmericaMushrooms",
            _roboflow_splits("odinw/NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco"),
        ),
        ("Packages", _roboflow_splits("odinw/Packages/Raw")),
        # The PascalVOC export has no test split; GLIP's "test" entry points at valid/ too.
        ("PascalVOC", {split: _roboflow_splits("odinw/PascalVOC", ("val",))["val"] for split in ("val", "test")}),
        # One folder for every split; the json is named after the split.
        ("pistols", {s: ("odinw/pistols/export", f"odinw/pistols/export/{s}_{_JSON}") for s in ("val", "test")}),
        ("pothole", _roboflow_splits("odinw/pothole")),
        ("Raccoon", _roboflow_splits("odinw/Raccoon/Raccoon.v2-raw.coco")),
        ("ShellfishOpenImages", _roboflow_splits("odinw/ShellfishOpenImages/raw")),
        ("thermalDogsAndPeople", _roboflow_splits("odinw/thermalDogsAndPeople")),
        ("VehiclesOpenImages", _roboflow_splits("odinw/VehiclesOpenImages/416x416", ("val", "minival", "test"))),
    ]
)

# The split of each dataset that GLIP's DATASETS.TEST evaluates (ODinW-13 numbers are on it).
ODINW13_BENCHMARK_SPLIT: Dict[str, str] = {
    short: ("minival" if short in ("EgoHands", "VehiclesOpenImages") else "val") for short in ODINW13_SPLITS
}

# short name -> (image root, json file) of the benchmark split, relative to the datasets root.
ODINW13_DATASETS: "OrderedDict[str, Tuple[str, str]]" = OrderedDict(
    (short, splits[ODINW13_BENCHMARK_SPLIT[short]]) for short, splits in ODINW13_SPLITS.items()
)

# The class names (in category-id order) GLIP evaluates each dataset with (its configs'
# DATASETS.OVERRIDE_CATEGORY). Only used to warn when a json's categories differ from them.
ODINW13_CLASS_NAMES: Dict[str, Tuple[str, ...]] = {
    "AerialMaritimeDrone": ("boat", "car", "dock", "jetski", "lift"),
    "Aquarium": ("fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"),
    "CottontailRabbits": ("Cottontail-Rabbit",),
    "EgoHands": ("hand",),
    "NorthAmericaMushrooms": ("CoW", "chanterelle"),
    "Packages": ("package",),
    "PascalVOC": (
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
        "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    ),
    "pistols": ("pistol",),
    "pothole": ("pothole",),
    "Raccoon": ("raccoon",),
    "ShellfishOpenImages": ("Crab", "Lobster", "Shrimp"),
    "thermalDogsAndPeople": ("dog", "person"),
    "VehiclesOpenImages": ("Ambulance", "Bus", "Car", "Motorcycle", "Truck"),
}

# Registration warnings already logged in this process.
_WARNED = set()


# ---------------------------------------------------------------------------------------------
# Names and paths
def odinw_root(root: Optional[str] = None) -> str:
    """The datasets root: ``root``, else ``$DETECTRON2_DATASETS``, else ``datasets`` (as detectron2)."""
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(root)


def _split_of(short: str, split: str) -> str:
    if short not in ODINW13_SPLITS:
        raise ValueError(f"Unknown ODinW-13 dataset {short!r}; the 13 are: {', '.join(ODINW13_SPLITS)}.")
    split = ODINW13_BENCHMARK_SPLIT[short] if split == BENCHMARK_SPLIT else split
    if split not in ODINW13_SPLITS[short]:
        raise ValueError(
            f"ODinW dataset {short!r} has no {split!r} split; it has {sorted(ODINW13_SPLITS[short])} "
            f"(or {BENCHMARK_SPLIT!r}, the split GLIP evaluates)."
        )
    return split


def odinw_dataset_name(short: str, split: str = BENCHMARK_SPLIT, prefix: str = ODINW_PREFIX) -> str:
    """
    The registered name of one ODinW dataset split.

    Args:
        short: a key of :data:`ODINW13_DATASETS`, e.g. "Aquarium".
        split: "val", "minival", "test" or "benchmark" (the split GLIP evaluates).
        prefix: the name prefix given to :func:`register_odinw`.

    Returns:
        e.g. "odinw13_Aquarium_val", "odinw13_EgoHands_minival".
    """
    return f"{prefix}_{short}_{_split_of(short, split)}"


def odinw_paths(short: str, split: str = BENCHMARK_SPLIT, root: Optional[str] = None) -> Tuple[str, str]:
    """
    Where one ODinW dataset split is expected.

    Args:
        short: a key of :data:`ODINW13_DATASETS`.
        split: "val", "minival", "test" or "benchmark".
        root: datasets root (default ``$DETECTRON2_DATASETS`` or ``datasets``).

    Returns:
        (image root, json file), both under ``root``.
    """
    image_root, json_file = ODINW13_SPLITS[short][_split_of(short, split)]
    root = odinw_root(root)
    return os.path.join(root, image_root), os.path.join(root, json_file)


def resolve_odinw_names(names: Sequence[str]) -> List[str]:
    """
    Short names of :data:`ODINW13_DATASETS` from user input: matched case-insensitively, so
    "pistols", "Pistols" and "PISTOLS" all name ``pistols``; order kept, duplicates dropped.

    Raises:
        ValueError: a name that is none of the 13 (the message lists them).
    """
    by_lower = {short.lower(): short for short in ODINW13_SPLITS}
    out = []
    for name in names:
        short = by_lower.get(name.strip().lower())
        if short is None:
            raise ValueError(f"Unknown ODinW-13 dataset {name!r}; the 13 are: {', '.join(ODINW13_SPLITS)}.")
        if short not in out:
            out.append(short)
    return out


def missing_odinw_datasets(
    root: Optional[str] = None, split: str = BENCHMARK_SPLIT, names: Optional[Sequence[str]] = None
) -> "OrderedDict[str, str]":
    """
    The ODinW datasets that cannot be evaluated under ``root``, with why: json or image folder
    missing, or a json whose categories are unreadable or hold a background placeholder.

    Args:
        root: datasets root (default ``$DETECTRON2_DATASETS`` or ``datasets``).
        split: "val", "minival", "test" or "benchmark".
        names: short names to check (default all 13).

    Returns:
        OrderedDict short name -> one-line reason naming the missing path (or the missing split).
    """
    out = OrderedDict()
    for short in names if names is not None else ODINW13_SPLITS:
        try:
            image_root, json_file = odinw_paths(short, split, root)
        except ValueError as e:
            out[short] = str(e)
            continue
        if not PathManager.isfile(json_file):
            out[short] = f"annotation file not found: {json_file}"
        elif not PathManager.isdir(image_root):
            out[short] = f"image folder not found: {image_root}"
        else:
            try:
                _vocabulary_of(json_file)
            except (OSError, ValueError) as e:
                out[short] = " ".join(str(e).split())  # one line
    return out


def available_odinw_datasets(
    root: Optional[str] = None, split: str = BENCHMARK_SPLIT, names: Optional[Sequence[str]] = None
) -> List[str]:
    """
    The ODinW datasets present and usable under ``root`` (the complement of
    :func:`missing_odinw_datasets`).

    Args:
        root: datasets root (default ``$DETECTRON2_DATASETS`` or ``datasets``).
        split: "val", "minival", "test" or "benchmark".
        names: short names to check (default all 13).

    Returns:
        short names, in the order of :data:`ODINW13_DATASETS` (or of ``names``).
    """
    names = list(names if names is not None else ODINW13_SPLITS)
    missing = missing_odinw_datasets(root, split, names)
    return [short for short in names if short not in missing]


# ---------------------------------------------------------------------------------------------
# Categories
def _is_background(category: dict) -> bool:
    # Roboflow's dataset-level placeholder (id 0), or an explicit background class (GLIP's rule).
    return category["id"] == 0 or category["name"] == "__background__"


def odinw_vocabulary(categories: Sequence[dict], json_file: str = "the json") -> Tuple[List[str], Dict[int, int]]:
    """
    The classes of an ODinW json: its category names ordered by id.

    Args:
        categories: the json's ``"categories"`` entries.
        json_file: named in errors.

    Returns:
        (thing_classes, thing_dataset_id_to_contiguous_id), as detectron2's ``load_coco_json``
        makes them.

    Raises:
        ValueError: a background placeholder category (id 0 or ``__background__``) is present, or
            there is no category. Detectron2's loader would make the placeholder a class (a word
            such as "movable-objects" in the vocabulary) and its ``COCOEvaluator`` needs the
            json's categories and the classes to be the same list, so such a file is refused.
    """
    by_id = {c["id"]: c for c in categories}  # as pycocotools: the last entry of an id wins
    background = [by_id[i] for i in sorted(by_id) if _is_background(by_id[i])]
    if background:
        raise ValueError(
            f"{json_file} has the background placeholder categor{'y' if len(background) == 1 else 'ies'} "
            f"{[{k: c[k] for k in ('id', 'name')} for c in background]} of a raw Roboflow export, which is not "
            "a class. Use GLIP's annotations_without_background.json of the ODinW release, or delete that "
            "entry from the json's \"categories\"."
        )
    if not by_id:
        raise ValueError(f"{json_file} has an empty \"categories\" array: no class to recognise.")
    ids = sorted(by_id)
    return [by_id[i]["name"] for i in ids], {i: k for k, i in enumerate(ids)}


def _vocabulary_of(json_file: str) -> Tuple[List[str], Dict[int, int]]:
    categories = read_coco_categories(json_file)
    if categories is None:
        raise ValueError(
            f"{json_file} has no COCO \"categories\" array with \"id\" and \"name\" in each entry: it is "
            "not an ODinW annotation file (expected GLIP's annotations_without_background.json)."
        )
    return odinw_vocabulary(categories, json_file)


def _set_vocabulary(dataset_name: str, json_file: str) -> None:
    """Put the json's classes into the metadata (once); warn where they differ from GLIP's."""
    meta = MetadataCatalog.get(dataset_name)
    classes, id_map = _vocabulary_of(json_file)
    if meta.get("thing_classes", None) is not None:
        if list(meta.thing_classes) != classes or dict(meta.thing_dataset_id_to_contiguous_id) != id_map:
            raise ValueError(
                f"The categories of {json_file} changed since dataset {dataset_name!r} was registered "
                f"(were {list(meta.thing_classes)}, now {classes}); class names are read once, when the "
                "dataset is registered: start a new process."
            )
        return
    meta.set(thing_classes=classes, thing_dataset_id_to_contiguous_id=id_map)
    short = meta.get("odinw_dataset", None)
    expected = ODINW13_CLASS_NAMES.get(short)
    if expected is not None and tuple(classes) != expected:
        logger.warning(
            f"The classes of {dataset_name!r} ({json_file}) are {classes}, but GLIP evaluates {short} with "
            f"{list(expected)}: AP with this vocabulary is not comparable with GLIP's ODinW-13 numbers."
        )


def load_odinw_json(json_file: str, image_root: str, dataset_name: str) -> List[dict]:
    """
    detectron2 dataset dicts of one ODinW split: detectron2's ``load_coco_json``, after checking
    that the json's categories are all classes (:func:`odinw_vocabulary`).

    Args:
        json_file: the split's COCO json.
        image_root: the folder its ``file_name`` entries are relative to.
        dataset_name: the registered name (its metadata gets ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id`` if it lacks them).

    Returns:
        list of dataset dicts, ``category_id`` contiguous in ``[0, #classes)``.

    Raises:
        FileNotFoundError: the json is missing (the message says where the data belongs).
        ValueError: the json holds a background placeholder category, or no categories.
    """
    if not PathManager.isfile(json_file):
        raise FileNotFoundError(
            f"Annotation file {json_file} of ODinW dataset {dataset_name!r} does not exist. Put GLIP's ODinW "
            "release under $DETECTRON2_DATASETS/odinw/ (layout in regionspot/data/odinw.py)."
        )
    _set_vocabulary(dataset_name, json_file)
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    zero_ids = 0
    for record in dicts:
        for obj in record.get("annotations", []):
            zero_ids += obj.pop("id", None) == 0
    if zero_ids:
        # Roboflow numbers annotations from 0. pycocotools' COCOeval (and detectron2's fast
        # COCOeval) record a match by the ground truth's id, so a box with id 0 is never counted as
        # found: AP comes out as GLIP computed it, a little below the true AP on small splits.
        logger.info(
            f"{json_file} has an annotation with id 0, which COCO evaluation never counts as detected "
            "(as in GLIP's ODinW numbers)."
        )
    return dicts


# ---------------------------------------------------------------------------------------------
# Registration
def register_odinw(
    root: Optional[str] = None, prefix: str = ODINW_PREFIX, splits: Optional[Sequence[str]] = None
) -> List[str]:
    """
    Register the ODinW-13 splits as ``<prefix>_<dataset>_<split>`` (metadata ``json_file``,
    ``image_root``, ``evaluator_type="coco"``, ``odinw_dataset``, ``odinw_split`` and, when the json
    exists, ``thing_classes`` / ``thing_dataset_id_to_contiguous_id`` from its categories).

    Idempotent: a name already registered with the same files is kept (its vocabulary is filled in
    if its json has appeared since); one registered with other files (another ``root``) is
    registered again with these.

    Args:
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``datasets``.
        prefix: first part of every name (tests use their own to leave the global names alone).
        splits: the splits to register (default all: "val", "minival", "test").

    Returns:
        the registered names.
    """
    root = odinw_root(root)
    unknown = set(splits or ()) - set(_SPLIT_FOLDERS)
    if unknown:
        raise ValueError(f"Unknown ODinW split(s) {sorted(unknown)}: use {sorted(_SPLIT_FOLDERS)}.")
    names = []
    for short, short_splits in ODINW13_SPLITS.items():
        for split, (image_rel, json_rel) in short_splits.items():
            if splits is not None and split not in splits:
                continue
            name = f"{prefix}_{short}_{split}"
            image_root, json_file = os.path.join(root, image_rel), os.path.join(root, json_rel)
            if name in DatasetCatalog.list():
                meta = MetadataCatalog.get(name)
                if meta.get("json_file", None) == json_file and meta.get("image_root", None) == image_root:
                    if meta.get("thing_classes", None) is None:
                        _try_set_vocabulary(name, json_file)
                    names.append(name)
                    continue
                logger.info(f"Re-registering {name!r} with {json_file} (was {meta.get('json_file', None)})")
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            DatasetCatalog.register(name, functools.partial(load_odinw_json, json_file, image_root, name))
            MetadataCatalog.get(name).set(
                json_file=json_file, image_root=image_root, evaluator_type="coco",
                odinw_dataset=short, odinw_split=split,
            )
            _try_set_vocabulary(name, json_file)
            names.append(name)
    return names


def _try_set_vocabulary(dataset_name: str, json_file: str) -> None:
    # Registration runs at `import regionspot`: one unreadable json must not break the import. The
    # dataset stays registered without classes, and loading it raises the error.
    if not PathManager.isfile(json_file):
        return
    try:
        _set_vocabulary(dataset_name, json_file)
    except (OSError, ValueError) as e:
        message = f"ODinW dataset {dataset_name!r} registered without class names: {e}"
        if message not in _WARNED:  # registration is repeated (each import, each tool process)
            _WARNED.add(message)
            logger.warning(message)
