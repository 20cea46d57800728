"""Tests of regionspot.data: the generated shapes dataset and the LVIS helpers."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

import regionspot.data  # noqa: F401  (registers the datasets)
from regionspot.data.lvis import LVIS_MINIVAL_NAME, patch_lvis_numpy, register_lvis_minival
from regionspot.data.shapes import (
    MANIFEST_NAME,
    SHAPES_CLASSES,
    SHAPES_COLORS,
    generate_shapes_split,
    register_shapes_datasets,
)


def _read_rgb(path):
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, generate_shapes_split(root, "val", 20, seed=3)


def test_generation_is_deterministic(tmp_path, small_split):
    _, dicts_a = small_split
    root_b = str(tmp_path / "other")
    dicts_b = generate_shapes_split(root_b, "val", 20, seed=3)
    assert len(dicts_a) == len(dicts_b) == 20
    for a, b in zip(dicts_a, dicts_b):
        assert a["annotations"] == b["annotations"]
        assert (a["image_id"], a["height"], a["width"]) == (b["image_id"], b["height"], b["width"])
        assert os.path.basename(a["file_name"]) == os.path.basename(b["file_name"])
        assert np.array_equal(_read_rgb(a["file_name"]), _read_rgb(b["file_name"]))

    # A different seed gives a different dataset.
    dicts_c = generate_shapes_split(str(tmp_path / "seed4"), "val", 20, seed=4)
    assert [d["annotations"] for d in dicts_c] != [d["annotations"] for d in dicts_a]


def test_generation_is_idempotent(tmp_path):
    root = str(tmp_path)
    first = generate_shapes_split(root, "train", 10, seed=0)
    split_dir = tmp_path / "train"
    files = sorted(split_dir.iterdir())
    assert len(files) == 11  # 10 images and the manifest, no leftover temporary files
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}

    second = generate_shapes_split(root, "train", 10, seed=0)
    assert second == first
    assert {f.name: f.stat().st_mtime_ns for f in split_dir.iterdir()} == mtimes

    # Different arguments do not reuse the manifest.
    third = generate_shapes_split(root, "train", 12, seed=0)
    assert len(third) == 12
    assert json.loads((split_dir / MANIFEST_NAME).read_text())["num_images"] == 12
    # Image i depends only on (seed, i).
    assert [d["annotations"] for d in third[:10]] == [d["annotations"] for d in first]


def test_incomplete_split_is_regenerated(tmp_path):
    root = str(tmp_path)
    first = generate_shapes_split(root, "train", 5, seed=0)
    os.remove(first[2]["file_name"])
    second = generate_shapes_split(root, "train", 5, seed=0)
    assert os.path.isfile(first[2]["file_name"])
    assert second == first

    (tmp_path / "train" / MANIFEST_NAME).write_text("{truncated")
    assert generate_shapes_split(root, "train", 5, seed=0) == first


def test_annotations_are_consistent(small_split):
    _, dicts = small_split
    image_ids = [d["image_id"] for d in dicts]
    assert len(set(image_ids)) == len(image_ids)
    num_annotations = 0
    for d in dicts:
        assert isinstance(d["image_id"], int)
        image = _read_rgb(d["file_name"])
        assert image.shape == (d["height"], d["width"], 3) and image.dtype == np.uint8
        assert 1 <= len(d["annotations"]) <= 5
        for ann in d["annotations"]:
            num_annotations += 1
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert ann["iscrowd"] == 0
            assert 0 <= ann["category_id"] < len(SHAPES_CLASSES)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= d["width"] and y + h <= d["height"]
            assert 14 <= max(w, h) <= 80

            assert len(ann["segmentation"]) == 1
            poly = np.asarray(ann["segmentation"][0], dtype=np.float64).reshape(-1, 2)
            assert len(poly) >= 3
            assert np.allclose(poly.min(axis=0), [x, y])
            assert np.allclose(poly.max(axis=0), [x + w, y + h])
            assert 0 < ann["area"] <= w * h

            # The pixels inside the polygon have (roughly) the class colour, on average.
            mask = np.zeros(image.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.floor(poly).astype(np.int32)], 1)
            mean = image[mask.astype(bool)].mean(axis=0)
            assert np.abs(mean - np.asarray(SHAPES_COLORS[ann["category_id"]])).max() < 30
    assert num_annotations > len(dicts)


def test_registered_datasets(tmp_path):
    for name in ("regionspot_shapes_train", "regionspot_shapes_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == SHAPES_CLASSES
        assert meta.evaluator_type == "coco"
        assert len(meta.thing_colors) == len(SHAPES_CLASSES)
        assert not hasattr(meta, "json_file")

    names = register_shapes_datasets(root=str(tmp_path), prefix="test_data_shapes")
    assert names == ["test_data_shapes_train", "test_data_shapes_val"]
    # Lazy: nothing generated until the data is asked for.
    assert not any(tmp_path.iterdir())
    # Registering again is a no-op.
    assert register_shapes_datasets(root=str(tmp_path), prefix="test_data_shapes") == names
    try:
        assert len(DatasetCatalog.get("test_data_shapes_train")) == 300
        assert len(DatasetCatalog.get("test_data_shapes_val")) == 60
        assert MetadataCatalog.get("test_data_shapes_val").thing_colors == [
            list(c) for c in SHAPES_COLORS
        ]
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_coco_evaluator_on_shapes(tmp_path):
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    names = register_shapes_datasets(root=str(tmp_path / "data"), prefix="test_data_shapes_eval")
    try:
        dicts = DatasetCatalog.get(names[1])
        evaluator = COCOEvaluator(names[1], tasks=("bbox",), output_dir=str(tmp_path / "out"))
        evaluator.reset()
        for d in dicts:
            anns = d["annotations"]
            instances = Instances((d["height"], d["width"]))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            instances.scores = torch.ones(len(anns))
            instances.pred_classes = torch.tensor([a["category_id"] for a in anns])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
        results = evaluator.evaluate()
        assert results["bbox"]["AP"] == pytest.approx(100.0, abs=1e-4)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_lvis_minival_registered():
    assert LVIS_MINIVAL_NAME == "lvis_v1_minival"
    assert register_lvis_minival() == LVIS_MINIVAL_NAME  # already registered: no crash
    meta = MetadataCatalog.get(LVIS_MINIVAL_NAME)
    assert meta.evaluator_type == "lvis"
    assert len(meta.thing_classes) == 1203
    assert meta.json_file.endswith(os.path.join("lvis", "lvis_v1_minival_inserted_image_name.json"))
    assert meta.image_root.rstrip("/").endswith("coco")


def test_patch_lvis_numpy_is_idempotent_and_noop(monkeypatch):
    patch_lvis_numpy()
    assert np.float is float
    patch_lvis_numpy()
    assert np.float is float

    sentinel = object()
    monkeypatch.setattr(np, "float", sentinel, raising=False)
    patch_lvis_numpy()
    assert np.float is sentinel


def _lvis_gt(path):
    categories = [
        {"id": 1, "name": "apple", "synset": "apple.n.01", "frequency": "r",
         "image_count": 1, "instance_count": 1},
        {"id": 2, "name": "banana", "synset": "banana.n.02", "frequency": "f",
         "image_count": 2, "instance_count": 2},
    ]
    images = [
        {"id": 1, "width": 200, "height": 150, "not_exhaustive_category_ids": [],
         "neg_category_ids": [1], "coco_url": "http://images.cocodataset.org/val2017/1.jpg"},
        {"id": 2, "width": 160, "height": 120, "not_exhaustive_category_ids": [],
         "neg_category_ids": [], "coco_url": "http://images.cocodataset.org/val2017/2.jpg"},
    ]
    boxes = [(1, 2, [10.0, 20.0, 50.0, 40.0]), (2, 1, [5.0, 5.0, 30.0, 60.0]),
             (2, 2, [80.0, 30.0, 40.0, 40.0])]
    annotations = []
    for i, (image_id, category_id, (x, y, w, h)) in enumerate(boxes, start=1):
        annotations.append({
            "id": i, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
            "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        })
    gt = {"images": images, "categories": categories, "annotations": annotations}
    path.write_text(json.dumps(gt))
    return gt


def test_lvis_eval_runs_after_patch(tmp_path):
    from lvis import LVIS, LVISEval

    patch_lvis_numpy()
    gt_path = tmp_path / "lvis_gt.json"
    gt = _lvis_gt(gt_path)
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
         "score": 1.0}
        for a in gt["annotations"]
    ]
    evaluator = LVISEval(LVIS(str(gt_path)), detections, "bbox")
    evaluator.run()
    results = evaluator.get_results()
    assert results["AP"] == pytest.approx(1.0, abs=1e-6)
    assert results["APr"] == pytest.approx(1.0, abs=1e-6)
    assert results["APf"] == pytest.approx(1.0, abs=1e-6)
