"""Tests of regionspot.data.proposals and tools/convert_detections_to_proposals.py (CPU, fast)."""
import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.build import load_proposals_into_dataset
from detectron2.data.detection_utils import transform_proposals
from detectron2.structures import BoxMode

from regionspot.data.proposals import (
    detections_to_proposals,
    load_coco_detections,
    save_proposals,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _det(image_id, bbox, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


DETECTIONS = [
    _det(1, [10, 20, 30, 40], 0.5),
    _det(1, [0, 0, 5, 5], 0.9),
    _det(1, [50, 50, 10, 10], 0.7),
    _det(2, [1, 2, 3, 4], 0.3),
]


def test_format_and_xywh_to_xyxy():
    p = detections_to_proposals([_det(7, [10, 20, 30, 40], 0.5)])
    assert set(p) == {"ids", "boxes", "objectness_logits", "bbox_mode"}
    assert p["ids"] == [7]
    assert p["bbox_mode"] == BoxMode.XYXY_ABS
    (boxes,) = p["boxes"]
    assert boxes.dtype == np.float32 and boxes.shape == (1, 4)
    np.testing.assert_allclose(boxes[0], [10, 20, 40, 60])
    (logits,) = p["objectness_logits"]
    assert logits.dtype == np.float32 and logits.shape == (1,)


def test_score_round_trip():
    scores = [0.0, 1e-7, 0.01, 0.25, 0.5, 0.75, 0.999, 1.0]
    dets = [_det(1, [i, i, 10, 10], s) for i, s in enumerate(scores)]
    p = detections_to_proposals(dets)
    got = _sigmoid(p["objectness_logits"][0])
    expected = np.clip(sorted(scores, reverse=True), 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.all(np.isfinite(p["objectness_logits"][0]))


def test_sorted_by_descending_score_per_image():
    p = detections_to_proposals(DETECTIONS)
    assert p["ids"] == [1, 2]
    np.testing.assert_allclose(_sigmoid(p["objectness_logits"][0]), [0.9, 0.7, 0.5], atol=1e-5)
    np.testing.assert_allclose(
        p["boxes"][0], [[0, 0, 5, 5], [50, 50, 60, 60], [10, 20, 40, 60]]
    )
    np.testing.assert_allclose(p["boxes"][1], [[1, 2, 4, 6]])


def test_duplicate_boxes_kept_by_default_merged_on_request():
    dets = [
        _det(1, [10, 10, 20, 20], 0.2, category_id=1),
        _det(1, [10, 10, 20, 20], 0.8, category_id=2),
        _det(1, [10, 10, 20, 20], 0.5, category_id=3),
        _det(1, [10, 10, 20, 21], 0.4, category_id=1),  # different box: kept
        _det(2, [10, 10, 20, 20], 0.1, category_id=1),  # same box, other image: kept
    ]
    # By default every detection stays a prompt (the authors' protocol).
    p = detections_to_proposals(dets)
    assert len(p["boxes"][0]) == 4
    np.testing.assert_allclose(_sigmoid(p["objectness_logits"][0]), [0.8, 0.5, 0.4, 0.2], atol=1e-5)
    p = detections_to_proposals(dets, merge_duplicates=True)
    np.testing.assert_allclose(p["boxes"][0], [[10, 10, 30, 30], [10, 10, 30, 31]])
    np.testing.assert_allclose(_sigmoid(p["objectness_logits"][0]), [0.8, 0.4], atol=1e-5)
    assert len(p["boxes"][1]) == 1


def test_min_score_cap_and_nms():
    dets = [
        _det(1, [0, 0, 10, 10], 0.9),
        _det(1, [1, 0, 10, 10], 0.8),  # IoU 9/11 with the first
        _det(1, [100, 100, 10, 10], 0.6),
        _det(1, [200, 200, 10, 10], 0.05),
    ]
    p = detections_to_proposals(dets, min_score=0.1)
    assert len(p["boxes"][0]) == 3
    p = detections_to_proposals(dets, class_agnostic_nms_iou=0.5)
    np.testing.assert_allclose(_sigmoid(p["objectness_logits"][0]), [0.9, 0.6, 0.05], atol=1e-5)
    p = detections_to_proposals(dets, max_per_image=2)
    np.testing.assert_allclose(_sigmoid(p["objectness_logits"][0]), [0.9, 0.8], atol=1e-5)


def test_image_ids_gives_every_image_an_entry():
    p = detections_to_proposals(DETECTIONS, image_ids=[3, 2, 1])
    assert p["ids"] == [3, 2, 1]
    assert p["boxes"][0].shape == (0, 4) and p["boxes"][0].dtype == np.float32
    assert p["objectness_logits"][0].shape == (0,)
    assert len(p["boxes"][1]) == 1 and len(p["boxes"][2]) == 3
    # Nothing detected at all.
    p = detections_to_proposals([], image_ids=[5, 6])
    assert p["ids"] == [5, 6] and all(b.shape == (0, 4) for b in p["boxes"])


def test_unknown_image_id_raises():
    with pytest.raises(ValueError, match="image_id=2"):
        detections_to_proposals(DETECTIONS, image_ids=[1, 3])


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"image_id": 1, "bbox": [0, 0, 1, 1]}, r"#2 lacks the key\(s\) \['score'\]"),
        ({"image_id": 1, "bbox": [5, 5, -3, 4], "score": 0.5}, r"#2 .*negative width"),
        ({"image_id": 1, "bbox": [0, 0, 1], "score": 0.5}, r"#2 has bbox"),
        ([1, 2, 3], r"#2 is a list"),
        ({"image_id": 1, "bbox": [0, 0, 1, 1], "score": float("nan")}, r"#2 has score"),
    ],
)
def test_bad_entry_message(bad, pattern):
    dets = [_det(1, [0, 0, 1, 1], 0.5), _det(1, [0, 0, 2, 2], 0.5), bad]
    with pytest.raises(ValueError, match=pattern) as info:
        detections_to_proposals(dets)
    msg = str(info.value)
    if "negative" in pattern:
        assert "x2 - x1" in msg  # tells how to fix corner-format boxes
    if "lacks" in pattern:
        assert "COCO" in msg


def test_non_list_input_raises():
    with pytest.raises(ValueError, match="list"):
        detections_to_proposals({"annotations": []})


def test_load_coco_detections(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(DETECTIONS))
    assert load_coco_detections(str(path)) == DETECTIONS
    path.write_text(json.dumps({"annotations": DETECTIONS}))
    assert load_coco_detections(str(path)) == DETECTIONS
    with pytest.raises(FileNotFoundError, match="not found"):
        load_coco_detections(str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_coco_detections(str(path))


def test_save_proposals_atomic_and_makes_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "proposals.pkl"
    p = detections_to_proposals(DETECTIONS)
    save_proposals(p, str(path))
    assert os.listdir(path.parent) == ["proposals.pkl"]  # no temp file left behind
    with open(path, "rb") as f:
        loaded = pickle.load(f)
    assert loaded["ids"] == p["ids"]
    for a, b in zip(loaded["boxes"], p["boxes"]):
        np.testing.assert_array_equal(a, b)


def test_detectron2_loads_written_pickle(tmp_path):
    name = "regionspot_test_proposals_tiny"
    dicts = [
        {"image_id": 1, "file_name": "a.jpg", "height": 100, "width": 120},
        {"image_id": 4, "file_name": "b.jpg", "height": 80, "width": 60},
    ]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    try:
        dataset = DatasetCatalog.get(name)
        dets = [
            _det(1, [10, 20, 30, 40], 0.5),
            _det(1, [0, 0, 5, 5], 0.9, category_id=1),
            _det(1, [0, 0, 5, 5], 0.6, category_id=2),  # duplicate of the 0.9 box
        ]
        proposals = detections_to_proposals(dets, image_ids=[d["image_id"] for d in dataset], merge_duplicates=True)
        path = tmp_path / "proposals.pkl"
        save_proposals(proposals, str(path))

        loaded = load_proposals_into_dataset(dataset, str(path))
        assert [d["image_id"] for d in loaded] == [1, 4]

        d0 = loaded[0]
        transform_proposals(
            d0, (d0["height"], d0["width"]), transforms=T.TransformList([]), proposal_topk=10
        )
        inst = d0["proposals"]
        assert inst.image_size == (100, 120)
        torch.testing.assert_close(
            inst.proposal_boxes.tensor, torch.tensor([[0.0, 0, 5, 5], [10, 20, 40, 60]])
        )
        torch.testing.assert_close(
            torch.sigmoid(inst.objectness_logits), torch.tensor([0.9, 0.5]), atol=1e-5, rtol=0
        )

        d1 = loaded[1]  # no detections: an empty entry, not a KeyError
        transform_proposals(
            d1, (d1["height"], d1["width"]), transforms=T.TransformList([]), proposal_topk=10
        )
        assert len(d1["proposals"]) == 0
        assert d1["proposals"].proposal_boxes.tensor.shape == (0, 4)
    finally:
        DatasetCatalog.remove(name)


def test_cli(tmp_path):
    dets_path = tmp_path / "results.json"
    dets_path.write_text(json.dumps(DETECTIONS + [_det(2, [1, 2, 3, 4], 0.05)]))
    out = tmp_path / "out" / "proposals.pkl"
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "tools", "convert_detections_to_proposals.py"),
        "--detections", str(dets_path),
        "--output", str(out),
        "--min-score", "0.1",
        "--max-per-image", "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 images" in res.stdout and "3 boxes" in res.stdout, res.stdout
    with open(out, "rb") as f:
        p = pickle.load(f)
    assert p["ids"] == [1, 2]
    assert [len(b) for b in p["boxes"]] == [2, 1]
    assert p["bbox_mode"] == BoxMode.XYXY_ABS

    # A clear error for a missing input file.
    cmd[3] = str(tmp_path / "missing.json")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert res.returncode != 0 and "not found" in res.stderr
