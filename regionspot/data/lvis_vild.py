"""
LVIS v1 under ViLD's open-vocabulary protocol (Gu et al., "Open-vocabulary Object Detection via Vision
and Language Knowledge Distillation", ICLR 2022).

The protocol: train on LVIS v1 ``train`` with the RARE categories held out, i.e. with the annotations of
the 866 frequent + common ("base") categories only; evaluate on LVIS v1 ``val`` with all 1203
categories and report APr, the AP of the 337 rare ("novel") categories.

Datasets
--------
``lvis_v1_train_base`` (:data:`LVIS_V1_TRAIN_BASE`), registered by :func:`register_lvis_vild`:
    the images of ``$DETECTRON2_DATASETS/lvis/lvis_v1_train.json`` (read from
    ``$DETECTRON2_DATASETS/coco/<train2017|val2017>/``, the split folder taken from each image's
    ``coco_url``, as detectron2's own ``lvis_v1_train``) with every annotation of a rare category
    removed. Its metadata is set at registration, without reading the json:

    - ``thing_classes``: the base categories' names, ordered by LVIS category id (866 names). As for
      detectron2's ``lvis_v1_*`` datasets, a category's name is its first synonym, so a base class is
      encoded with the same text in training and in evaluation on ``lvis_v1_val``. In this project a
      training dataset's ``thing_classes`` are the vocabulary its batches are classified against.
    - ``thing_dataset_id_to_contiguous_id``: LVIS category id -> index into ``thing_classes`` (the
      ``category_id`` of every loaded annotation is such an index).
    - ``base_category_ids`` / ``rare_category_ids``: the LVIS ids of the split.
    - ``class_image_count``: detectron2's per-category image counts of LVIS v1 train, base categories
      only (what detectron2's federated loss reads), when known.
    - ``json_file``, ``image_root``, ``evaluator_type="lvis"``.

``lvis_v1_val`` (:data:`LVIS_VILD_TEST`): the evaluation side needs nothing new. detectron2
registers it with all 1203 categories and ``evaluator_type="lvis"``; its ``LVISEvaluator`` reports
AP, APr, APc and APf, and ``train_net.py`` evaluates it with its own ``thing_classes`` (all 1203
names) as the vocabulary. APr is the ViLD number.

How the split is computed
-------------------------
From LVIS metadata, never from a hand-written list: a category is rare when its ``frequency`` field
is ``"r"`` (in fewer than 11 training images), base when it is ``"c"`` or ``"f"``
(:func:`lvis_rare_category_ids`, :func:`lvis_base_category_ids`). At registration the split and the
metadata come from detectron2's copy of the LVIS v1 category list
(``detectron2.data.datasets.lvis_v1_categories.LVIS_CATEGORIES``); when the json is loaded, its own
``categories`` are read and must agree with that list (ids, names and frequencies), else the load
stops with an error naming the file.

Images whose only annotations are rare
--------------------------------------
They are KEPT, with an empty annotation list, as in Detic's ``lvis_v1_train_norare.json`` (which
removes the rare annotations and leaves the image list untouched). Whether such images are trained
on is then the training loader's choice, as for any LVIS image without annotations:
``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (True by default, in detectron2 and here) skips them. Keeping
them also keeps the dataset's image ids and count equal to ``lvis_v1_train``'s.

Negative labels are labels too: the rare ids are also removed from each image's
``neg_category_ids`` and ``not_exhaustive_category_ids`` (which stay LVIS category ids, as in
detectron2's loader), so nothing of the loaded split mentions a rare category.
"""
import functools
import json
import logging
import os
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "LVIS_V1_TRAIN_BASE",
    "LVIS_VILD_TEST",
    "check_lvis_categories",
    "load_lvis_base_json",
    "lvis_base_category_ids",
    "lvis_base_metadata",
    "lvis_rare_category_ids",
    "lvis_v1_categories",
    "register_lvis_vild",
]

LVIS_V1_TRAIN_BASE = "lvis_v1_train_base"
# The test set of the protocol: detectron2's builtin registration (all 1203 classes).
LVIS_VILD_TEST = "lvis_v1_val"

# (image root, json file) under the datasets root: the files of detectron2's own "lvis_v1_train".
_TRAIN_SPLIT = ("coco/", "lvis/lvis_v1_train.json")

RARE = "r"
BASE_FREQUENCIES = ("c", "f")
_FREQUENCIES = (RARE,) + BASE_FREQUENCIES

# How many differences an error message lists before it only counts them.
_MAX_LISTED = 5


# ---------------------------------------------------------------------------------------------
# The split
def lvis_v1_categories() -> List[Dict[str, Any]]:
    """
    detectron2's copy of the LVIS v1 category list (``id``, ``name``, ``synonyms``, ``frequency``, ...).

    Returns:
        the 1203 category dicts, ordered by id.
    """
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return sorted(LVIS_CATEGORIES, key=lambda c: c["id"])


def _frequency_by_id(categories: Sequence[Mapping[str, Any]], source: str) -> Dict[int, str]:
    # Validates the fields the split depends on, so a non-LVIS file fails here, by name, rather
    # than with a KeyError deep inside a loader.
    freq: Dict[int, str] = {}
    for c in categories:
        if "id" not in c:
            raise ValueError(f"{source}: a category has no 'id' field: {dict(c)!r}.")
        f = c.get("frequency")
        if f not in _FREQUENCIES:
            raise ValueError(
                f"{source}: category id {c['id']} ({c.get('name')!r}) has frequency {f!r}; LVIS categories "
                f"need 'frequency' in {list(_FREQUENCIES)} ('r' = rare) to split base from rare. "
                "Use an LVIS v1 annotation file (lvis_v1_train.json)."
            )
        if c["id"] in freq:
            raise ValueError(f"{source}: category id {c['id']} appears more than once.")
        freq[int(c["id"])] = f
    return freq


def lvis_base_category_ids(categories: Sequence[Mapping[str, Any]], source: str = "categories") -> List[int]:
    """
    The LVIS ids of the base categories (``frequency`` ``"c"`` or ``"f"``) of ViLD's split.

    Args:
        categories: LVIS category dicts, each with ``id`` and ``frequency`` (a json's
            ``"categories"`` or :func:`lvis_v1_categories`).
        source: what the categories came from, for error messages (e.g. the json's path).

    Returns:
        the ids, ascending (866 for LVIS v1).

    Raises:
        ValueError: a category without an id, with a missing or unknown frequency, or a repeated id.
    """
    freq = _frequency_by_id(categories, source)
    return sorted(i for i, f in freq.items() if f in BASE_FREQUENCIES)


def lvis_rare_category_ids(categories: Sequence[Mapping[str, Any]], source: str = "categories") -> List[int]:
    """
    The LVIS ids of the rare categories (``frequency`` ``"r"``), held out of training by ViLD's protocol.

    Args:
        categories: LVIS category dicts, each with ``id`` and ``frequency``.
        source: what the categories came from, for error messages.

    Returns:
        the ids, ascending (337 for LVIS v1).

    Raises:
        ValueError: as :func:`lvis_base_category_ids`.
    """
    freq = _frequency_by_id(categories, source)
    return sorted(i for i, f in freq.items() if f == RARE)


def _class_name(category: Mapping[str, Any]) -> str:
    # detectron2 names LVIS classes by their first synonym (differs from "name" for one LVIS v1
    # category); the same convention keeps train and test vocabularies textually identical.
    synonyms = category.get("synonyms") or []
    return synonyms[0] if synonyms else category["name"]


def lvis_base_metadata(
    categories: Sequence[Mapping[str, Any]],
    class_image_count: Optional[Sequence[Mapping[str, Any]]] = None,
    source: str = "categories",
) -> Dict[str, Any]:
    """
    detectron2 metadata of the base split defined by ``categories``.

    Args:
        categories: LVIS category dicts (``id``, ``name``, ``synonyms``, ``frequency``).
        class_image_count: ``[{"id", "image_count"}, ...]`` for detectron2's federated loss; None
            uses the categories' own ``image_count`` when each base category has one, else leaves
            the key out.
        source: what the categories came from, for error messages.

    Returns:
        dict with ``thing_classes`` (base names in id order), ``thing_dataset_id_to_contiguous_id``,
        ``base_category_ids``, ``rare_category_ids`` and, when known, ``class_image_count`` (base
        categories only, in id order).
    """
    base_ids = lvis_base_category_ids(categories, source)
    by_id = {int(c["id"]): c for c in categories}
    meta: Dict[str, Any] = {
        "thing_classes": [_class_name(by_id[i]) for i in base_ids],
        "thing_dataset_id_to_contiguous_id": {i: k for k, i in enumerate(base_ids)},
        "base_category_ids": base_ids,
        "rare_category_ids": lvis_rare_category_ids(categories, source),
    }
    if class_image_count is None and all("image_count" in by_id[i] for i in base_ids):
        class_image_count = [{"id": i, "image_count": by_id[i]["image_count"]} for i in base_ids]
    if class_image_count is not None:
        counts = {int(c["id"]): c["image_count"] for c in class_image_count}
        if all(i in counts for i in base_ids):
            meta["class_image_count"] = [{"id": i, "image_count": counts[i]} for i in base_ids]
    return meta


def check_lvis_categories(
    found: Sequence[Mapping[str, Any]], expected: Sequence[Mapping[str, Any]], source: str, dataset_name: str = ""
) -> None:
    """
    Check that an annotation file's categories agree with the ones a dataset was registered with:
    same ids and, per id, the same class name (first synonym) and frequency.

    Args:
        found: the file's ``"categories"``.
        expected: the categories the dataset's metadata was built from.
        source: the file's path (named in the error).
        dataset_name: the dataset's name (named in the error).

    Raises:
        ValueError: listing the first differences and how to fix them.
    """
    found_freq = _frequency_by_id(found, source)
    expected_by_id = {int(c["id"]): c for c in expected}
    found_by_id = {int(c["id"]): c for c in found}
    missing = sorted(set(expected_by_id) - set(found_by_id))
    unexpected = sorted(set(found_by_id) - set(expected_by_id))
    changed = []
    for i in sorted(set(found_by_id) & set(expected_by_id)):
        want, got = expected_by_id[i], found_by_id[i]
        if _class_name(got) != _class_name(want):
            changed.append(f"id {i} is named {_class_name(got)!r}, expected {_class_name(want)!r}")
        if found_freq[i] != want.get("frequency"):
            changed.append(f"id {i} ({_class_name(want)!r}) has frequency {found_freq[i]!r}, expected {want.get('frequency')!r}")
    # Changed categories first: they are the subtle case (a wholly different file is obvious anyway).
    problems = (
        changed
        + [f"id {i} ({_class_name(expected_by_id[i])!r}) is missing" for i in missing]
        + [f"id {i} ({_class_name(found_by_id[i])!r}) is not expected" for i in unexpected]
    )
    if not problems:
        return
    listed = "; ".join(problems[:_MAX_LISTED]) + (f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
    what = f"dataset {dataset_name!r}" if dataset_name else "the dataset"
    raise ValueError(
        f"The categories of {source} disagree with the {len(expected_by_id)} categories {what} was registered "
        f"with (its base/rare split and thing_classes were fixed then). Differences: {len(changed)} in name or "
        f"frequency, {len(missing)} ids missing, {len(unexpected)} ids not expected; {listed}. "
        "Point the dataset at LVIS v1's lvis_v1_train.json, or register it with "
        "register_lvis_vild(..., categories=<this file's categories>) to make the file's categories the split."
    )


# ---------------------------------------------------------------------------------------------
# Loading
def _image_path(image_root: str, image: Mapping[str, Any], source: str) -> str:
    # LVIS v1 images live in COCO's train2017/ or val2017/, named by the last two parts of coco_url
    # (detectron2's convention for its lvis_v1_* datasets); a json with plain file names also works.
    if image.get("coco_url"):
        split_folder, file_name = image["coco_url"].split("/")[-2:]
        return os.path.join(image_root, split_folder, file_name)
    if image.get("file_name"):
        return os.path.join(image_root, image["file_name"])
    raise ValueError(f"{source}: image id {image.get('id')} has neither 'coco_url' nor 'file_name'.")


def load_lvis_base_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    expected_categories: Optional[Sequence[Mapping[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """
    Load an LVIS-format json as detectron2 dicts with the rare categories held out (ViLD's base split).

    The split comes from the file's own ``categories`` (``frequency`` ``"r"`` = rare). Every image is
    kept; its annotations of rare categories are dropped, and rare ids are removed from its
    ``neg_category_ids`` / ``not_exhaustive_category_ids``.

    Args:
        json_file: the LVIS annotation file (e.g. ``lvis_v1_train.json``).
        image_root: directory holding COCO's ``train2017/`` and ``val2017/`` (for LVIS; images without
            ``coco_url`` are read from ``image_root/file_name``).
        dataset_name: when given and its metadata has no ``thing_classes`` yet, the base metadata of
            the file (:func:`lvis_base_metadata`) is stored under this name; when it has them, they
            must be the file's base names.
        expected_categories: the categories the dataset was registered with; the file's must agree
            (:func:`check_lvis_categories`).

    Returns:
        one dict per image (sorted by image id) with ``file_name``, ``height``, ``width``,
        ``image_id``, ``neg_category_ids``, ``not_exhaustive_category_ids`` (LVIS ids, base only) and
        ``annotations`` (``bbox`` XYWH_ABS, ``category_id`` = index into the base ``thing_classes``,
        ``segmentation`` when the file has it).

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        ValueError: the file has no categories, its categories lack a valid frequency or disagree
            with ``expected_categories``, an annotation names an unknown category, or the metadata
            of ``dataset_name`` holds other class names.
    """
    if not PathManager.isfile(json_file):
        what = f" of dataset {dataset_name!r}" if dataset_name else ""
        raise FileNotFoundError(
            f"LVIS annotation file {json_file}{what} does not exist. Put lvis_v1_train.json under "
            "$DETECTRON2_DATASETS/lvis/ (images under $DETECTRON2_DATASETS/coco/), or pass root= / "
            "json_file= to register_lvis_vild."
        )
    with PathManager.open(json_file, "r") as f:
        data = json.load(f)
    categories = data.get("categories") if isinstance(data, dict) else None
    if not categories:
        raise ValueError(f"{json_file} has no 'categories': not an LVIS annotation file.")
    if expected_categories is not None:
        check_lvis_categories(categories, expected_categories, json_file, dataset_name or "")

    meta = lvis_base_metadata(categories, source=json_file)
    to_contiguous = meta["thing_dataset_id_to_contiguous_id"]
    rare = set(meta["rare_category_ids"])
    if dataset_name is not None:
        _store_metadata(dataset_name, meta, json_file)

    annotations_by_image: Dict[Any, List[Mapping[str, Any]]] = defaultdict(list)
    for ann in data.get("annotations", []):
        annotations_by_image[ann["image_id"]].append(ann)

    records = []
    kept = dropped = emptied = 0
    for image in sorted(data.get("images", []), key=lambda im: im["id"]):
        objs = []
        had_annotations = bool(annotations_by_image.get(image["id"]))
        for ann in annotations_by_image.pop(image["id"], []):
            cid = ann["category_id"]
            if cid in rare:
                dropped += 1
                continue
            if cid not in to_contiguous:
                raise ValueError(
                    f"{json_file}: annotation id {ann.get('id')} has category_id {cid}, which is not among "
                    "the file's categories."
                )
            obj = {"bbox": ann["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": to_contiguous[cid]}
            if "segmentation" in ann:
                obj["segmentation"] = ann["segmentation"]
            objs.append(obj)
        kept += len(objs)
        emptied += int(had_annotations and not objs)
        records.append(
            {
                "file_name": _image_path(image_root, image, json_file),
                "height": image["height"],
                "width": image["width"],
                "image_id": image["id"],
                "neg_category_ids": [i for i in image.get("neg_category_ids", []) if i not in rare],
                "not_exhaustive_category_ids": [i for i in image.get("not_exhaustive_category_ids", []) if i not in rare],
                "annotations": objs,
            }
        )
    if annotations_by_image:
        orphan = next(iter(annotations_by_image))
        logger.warning(f"{json_file}: annotations of {len(annotations_by_image)} image ids not in 'images' "
                       f"(e.g. {orphan!r}) were ignored.")
    logger.info(
        f"Loaded LVIS base split of {json_file}: {len(records)} images, {kept} annotations of "
        f"{len(meta['base_category_ids'])} base categories kept, {dropped} annotations of "
        f"{len(rare)} rare categories removed; {emptied} images were left without annotations (kept)."
    )
    return records


def _store_metadata(dataset_name: str, meta: Dict[str, Any], json_file: str) -> None:
    target = MetadataCatalog.get(dataset_name)
    registered = target.get("thing_classes", None)
    if registered is None:
        target.set(**meta)
        return
    # detectron2's Metadata refuses to overwrite a key with another value; say why it differs.
    if list(registered) != meta["thing_classes"]:
        raise ValueError(
            f"{json_file} gives {len(meta['thing_classes'])} base classes, but dataset {dataset_name!r} has "
            f"{len(registered)} thing_classes in its metadata; register it with the file's categories "
            "(register_lvis_vild(..., categories=...))."
        )


# ---------------------------------------------------------------------------------------------
# Registration
def register_lvis_vild(
    root: Optional[str] = None,
    name: str = LVIS_V1_TRAIN_BASE,
    json_file: Optional[str] = None,
    image_root: Optional[str] = None,
    categories: Optional[Sequence[Mapping[str, Any]]] = None,
) -> str:
    """
    Register ViLD's LVIS base training split (lazily: nothing is read until ``DatasetCatalog.get``).

    The metadata (``thing_classes`` etc., see the module docstring) is set now, from ``categories``,
    so the model can read the training vocabulary before the data is loaded. Does nothing if
    ``name`` is already registered, so calling this twice is safe.

    Args:
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``datasets``.
        name: the dataset name.
        json_file: the LVIS annotation file; default ``<root>/lvis/lvis_v1_train.json``.
        image_root: directory holding COCO's ``train2017/`` and ``val2017/``; default ``<root>/coco/``.
        categories: the LVIS categories the split and metadata are built from, which the json's must
            match when it is loaded; default detectron2's LVIS v1 list (:func:`lvis_v1_categories`).

    Returns:
        the dataset name.
    """
    if name in DatasetCatalog.list():
        return name
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    root = os.path.expanduser(root)
    default_image_root, default_json = _TRAIN_SPLIT
    json_file = json_file if json_file is not None else os.path.join(root, default_json)
    image_root = image_root if image_root is not None else os.path.join(root, default_image_root)

    if categories is None:
        from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

        categories, class_image_count = lvis_v1_categories(), LVIS_CATEGORY_IMAGE_COUNT
    else:
        categories, class_image_count = [dict(c) for c in categories], None
    meta = lvis_base_metadata(categories, class_image_count, source=f"categories of {name!r}")

    DatasetCatalog.register(
        name, functools.partial(load_lvis_base_json, json_file, image_root, name, categories)
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis", **meta)
    logger.debug(f"Registered {name!r}: {len(meta['thing_classes'])} base classes, "
                 f"{len(meta['rare_category_ids'])} rare held out, from {json_file}")
    return name
