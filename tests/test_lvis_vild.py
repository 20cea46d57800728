"""ViLD's LVIS protocol: the base split (rare categories held out), its metadata and its configs."""
import copy
import json
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets.lvis import get_lvis_instances_meta, load_lvis_json
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from detectron2.engine import HookBase
from PIL import Image

from conftest import REPO_ROOT, tiny_cfg
from regionspot.config import get_regionspot_cfg
from regionspot.data.lvis_vild import (
    LVIS_V1_TRAIN_BASE,
    LVIS_VILD_TEST,
    load_lvis_base_json,
    lvis_base_category_ids,
    lvis_rare_category_ids,
    register_lvis_vild,
)
from regionspot.engine import Trainer

VILD_CONFIGS = [
    os.path.join(REPO_ROOT, "configs", "Training", "RegionSpot-BB_lvis-vild_base-train.yaml"),
    os.path.join(REPO_ROOT, "projects", "RegionSpot", "configs", "Detector-Relabel", "RegionSpot-BB_relabel-mask-rcnn-lvis-base_lvis-vild.yaml"),
]

# A tiny LVIS: ids 1..6, frequencies f c r f r c; "horned_cow" named by its first synonym as in LVIS v1.
CATEGORIES = [
    {"id": 1, "name": "apple", "synonyms": ["apple"], "frequency": "f", "image_count": 3},
    {"id": 2, "name": "bull", "synonyms": ["horned_cow", "bull"], "frequency": "c", "image_count": 2},
    {"id": 3, "name": "armoire", "synonyms": ["armoire"], "frequency": "r", "image_count": 1},
    {"id": 4, "name": "banana", "synonyms": ["banana"], "frequency": "f", "image_count": 2},
    {"id": 5, "name": "bagpipe", "synonyms": ["bagpipe"], "frequency": "r", "image_count": 1},
    {"id": 6, "name": "cabinet", "synonyms": ["cabinet"], "frequency": "c", "image_count": 1},
]
BASE_NAMES = ["apple", "horned_cow", "banana", "cabinet"]


def _box(x, y, w=12, h=10):
    return {"bbox": [x, y, w, h], "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "area": w * h}


def _lvis_json():
    """4 images 64x48: one with base + rare boxes, one rare only, one base only, one without boxes."""
    images, annotations = [], []
    per_image = {
        1: [(1, 2, 3), (3, 20, 5), (2, 30, 20), (5, 8, 30)],  # (category, x, y)
        2: [(3, 5, 5), (5, 25, 25)],  # only rare
        3: [(4, 10, 10), (6, 40, 30), (1, 3, 33)],
        4: [],
    }
    for image_id, boxes in per_image.items():
        split = "val2017" if image_id == 4 else "train2017"
        images.append({
            "id": image_id, "height": 48, "width": 64,
            "coco_url": f"http://images.cocodataset.org/{split}/{image_id:012d}.jpg",
            "neg_category_ids": [3, 6] if image_id == 1 else [5],
            "not_exhaustive_category_ids": [1, 5] if image_id == 3 else [],
        })
        for cat, x, y in boxes:
            annotations.append(dict(_box(x, y), id=len(annotations) + 1, image_id=image_id, category_id=cat))
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": copy.deepcopy(CATEGORIES)}


def _write(tmp_path, data, images=False):
    """The layout of $DETECTRON2_DATASETS: lvis/lvis_v1_train.json and coco/<split>/<file>."""
    os.makedirs(tmp_path / "lvis", exist_ok=True)
    path = tmp_path / "lvis" / "lvis_v1_train.json"
    path.write_text(json.dumps(data))
    if images:
        rng = np.random.default_rng(0)
        for im in data["images"]:
            split, name = im["coco_url"].split("/")[-2:]
            os.makedirs(tmp_path / "coco" / split, exist_ok=True)
            pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "coco" / split / name)
    return str(path)


def _unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _register_tiny(tmp_path, data=None, images=False, categories=CATEGORIES):
    _write(tmp_path, _lvis_json() if data is None else data, images=images)
    return register_lvis_vild(root=str(tmp_path), name=_unique("test_lvis_base"), categories=categories)


# ---------------------------------------------------------------------------------------------
def test_split_follows_the_frequency_field():
    assert lvis_base_category_ids(CATEGORIES) == [1, 2, 4, 6]
    assert lvis_rare_category_ids(CATEGORIES) == [3, 5]
    changed = copy.deepcopy(CATEGORIES)
    changed[3]["frequency"] = "r"  # banana becomes rare
    changed[2]["frequency"] = "c"  # armoire becomes common
    assert lvis_base_category_ids(changed) == [1, 2, 3, 6]
    assert lvis_rare_category_ids(changed) == [4, 5]
    bad = copy.deepcopy(CATEGORIES)
    del bad[0]["frequency"]
    with pytest.raises(ValueError, match=r"category id 1 .*frequency"):
        lvis_base_category_ids(bad, source="my.json")


def test_metadata_of_the_real_split_without_reading_any_file():
    # Registering twice is a no-op; nothing is read at registration (no LVIS files exist here).
    name = register_lvis_vild()
    assert register_lvis_vild() == name == LVIS_V1_TRAIN_BASE
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "lvis"
    assert meta.json_file.endswith(os.path.join("lvis", "lvis_v1_train.json"))
    assert meta.image_root.rstrip("/").endswith("coco")

    # Counts from detectron2's own LVIS v1 list: 866 base (405 f + 461 c), 337 rare.
    base = [c for c in LVIS_CATEGORIES if c["frequency"] in ("c", "f")]
    rare = [c for c in LVIS_CATEGORIES if c["frequency"] == "r"]
    assert len(base) == 866 and len(rare) == 337 and len(LVIS_CATEGORIES) == 1203
    assert lvis_base_category_ids(LVIS_CATEGORIES) == sorted(c["id"] for c in base) == meta.base_category_ids
    assert lvis_rare_category_ids(LVIS_CATEGORIES) == sorted(c["id"] for c in rare) == meta.rare_category_ids

    # The base names are lvis_v1_val's names (same text in training and evaluation), in id order.
    all_names = get_lvis_instances_meta("lvis_v1")["thing_classes"]
    assert len(meta.thing_classes) == 866
    assert meta.thing_classes == [all_names[i - 1] for i in meta.base_category_ids]
    assert meta.thing_dataset_id_to_contiguous_id == {i: k for k, i in enumerate(meta.base_category_ids)}
    assert [c["id"] for c in meta.class_image_count] == meta.base_category_ids

    # The evaluation side: detectron2's lvis_v1_val with all 1203 classes and the LVIS evaluator.
    val = MetadataCatalog.get(LVIS_VILD_TEST)
    assert val.evaluator_type == "lvis" and len(val.thing_classes) == 1203


def test_loading_removes_rare_annotations_and_keeps_images(tmp_path):
    name = _register_tiny(tmp_path)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == BASE_NAMES and meta.rare_category_ids == [3, 5]
    dicts = DatasetCatalog.get(name)
    by_id = {d["image_id"]: d for d in dicts}
    assert sorted(by_id) == [1, 2, 3, 4]  # the rare-only image (2) and the empty one (4) are kept

    names = lambda d: [meta.thing_classes[a["category_id"]] for a in d["annotations"]]  # noqa: E731
    assert names(by_id[1]) == ["apple", "horned_cow"]
    assert names(by_id[2]) == []
    assert names(by_id[3]) == ["banana", "cabinet", "apple"]
    assert by_id[1]["annotations"][1]["bbox"] == [30, 20, 12, 10]
    # No rare id survives, not even as a negative or not-exhaustive label (those stay LVIS ids).
    assert by_id[1]["neg_category_ids"] == [6] and by_id[2]["neg_category_ids"] == []
    assert by_id[3]["not_exhaustive_category_ids"] == [1]
    assert by_id[1]["file_name"] == os.path.join(str(tmp_path), "coco", "train2017", "000000000001.jpg")
    assert by_id[4]["file_name"] == os.path.join(str(tmp_path), "coco", "val2017", "000000000004.jpg")

    # Same records as detectron2's own LVIS loader, less the rare annotations, ids made contiguous.
    reference = load_lvis_json(str(tmp_path / "lvis" / "lvis_v1_train.json"), str(tmp_path / "coco") + "/")
    to_base = {i - 1: k for k, i in enumerate([1, 2, 4, 6])}  # detectron2's 0-based id -> base index
    for ref, ours in zip(reference, dicts):
        assert ref["file_name"] == ours["file_name"] and ref["image_id"] == ours["image_id"]
        expected = [dict(a, category_id=to_base[a["category_id"]]) for a in ref["annotations"] if a["category_id"] in to_base]
        assert ours["annotations"] == expected

    # Training skips the images without annotations (DATALOADER.FILTER_EMPTY_ANNOTATIONS).
    assert sorted(d["image_id"] for d in get_detection_dataset_dicts([name], filter_empty=True)) == [1, 3]


def test_split_follows_the_json_when_loaded_on_its_own(tmp_path):
    data = _lvis_json()
    data["categories"][3]["frequency"] = "r"  # banana is rare in this file
    json_file = _write(tmp_path, data)
    name = _unique("test_lvis_standalone")
    dicts = load_lvis_base_json(json_file, str(tmp_path / "coco"), dataset_name=name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["apple", "horned_cow", "cabinet"] and meta.rare_category_ids == [3, 4, 5]
    image3 = next(d for d in dicts if d["image_id"] == 3)
    assert [meta.thing_classes[a["category_id"]] for a in image3["annotations"]] == ["cabinet", "apple"]


@pytest.mark.parametrize("change, message", [
    (lambda cats: cats[3].update(frequency="r"), r"id 4 \('banana'\) has frequency 'r', expected 'f'"),
    (lambda cats: cats[1].update(synonyms=["bull"]), r"id 2 is named 'bull', expected 'horned_cow'"),
    (lambda cats: cats.pop(), r"id 6 \('cabinet'\) is missing"),
])
def test_a_json_that_disagrees_with_the_registration_fails_clearly(tmp_path, change, message):
    data = _lvis_json()
    change(data["categories"])
    name = _register_tiny(tmp_path, data)  # registered with the unchanged categories
    with pytest.raises(ValueError, match=message) as err:
        DatasetCatalog.get(name)
    assert str(tmp_path / "lvis" / "lvis_v1_train.json") in str(err.value) and name in str(err.value)


def test_the_real_registration_refuses_a_json_that_is_not_lvis_v1(tmp_path):
    json_file = _write(tmp_path, _lvis_json())
    name = register_lvis_vild(name=_unique("test_lvis_real_meta"), json_file=json_file, image_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"disagree with the 1203 categories dataset .*1197 ids missing.*and \d+ more"):
        DatasetCatalog.get(name)
    missing = register_lvis_vild(root=str(tmp_path / "nowhere"), name=_unique("test_lvis_missing"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*lvis_v1_train\.json"):
        DatasetCatalog.get(missing)


@pytest.mark.parametrize("path", VILD_CONFIGS, ids=os.path.basename)
def test_configs_train_on_base_and_test_on_all_classes(path):
    cfg = get_regionspot_cfg(path)
    assert tuple(cfg.DATASETS.TRAIN) == (LVIS_V1_TRAIN_BASE,)
    assert tuple(cfg.DATASETS.TEST) == (LVIS_VILD_TEST,)
    assert cfg.MODEL.REGIONSPOT.VOCAB.SOURCE == "dataset"  # test vocabulary = lvis_v1_val's 1203 names
    if cfg.MODEL.META_ARCHITECTURE == "RegionSpotRelabel":
        opts = list(cfg.MODEL.REGIONSPOT.DETECTOR.OPTS)
        assert opts[opts.index("MODEL.ROI_HEADS.NUM_CLASSES") + 1] == "866"
        from detectron2 import model_zoo

        assert os.path.isfile(model_zoo.get_config_file(cfg.MODEL.REGIONSPOT.DETECTOR.CONFIG.split(":", 1)[1]))


class _Vocabularies(HookBase):
    def __init__(self, out):
        self.out = out

    def before_train(self):
        classifier = self.trainer.model.roi_heads.classifier
        logits = classifier.forward

        def spy(region_embeddings, vocabulary=None):
            out = logits(region_embeddings, vocabulary)
            self.out.append((vocabulary, out.shape[-1]))
            return out

        classifier.forward = spy


def test_tiny_training_uses_the_base_vocabulary(tmp_path):
    name = _register_tiny(tmp_path, images=True)
    cfg = tiny_cfg("DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out"),
                   "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.CHECKPOINT_PERIOD", 1000,
                   "TEST.EVAL_PERIOD", 0, "SEED", 0)
    trainer = Trainer(cfg)
    assert trainer.model.roi_heads.classifier.vocabularies[name][0] == BASE_NAMES
    calls = []
    trainer.register_hooks([_Vocabularies(calls)])
    trainer.train()
    assert calls == [(name, len(BASE_NAMES))] * 2
    assert torch.isfinite(torch.tensor(trainer.storage.history("total_loss").latest()))
