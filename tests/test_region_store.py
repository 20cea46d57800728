"""Region stores: stored embeddings re-scored against a new vocabulary equal a direct run; resume; stale stores refused."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg

import regionspot
from regionspot.export.onnx_graphs import model_fingerprints
from regionspot.export.store import RegionStore, StaleStoreError


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


store_tool = _tool("store_region_embeddings")
rescore_tool = _tool("rescore_regions")

BOXES = {
    "a.png": [[10, 20, 100, 150], [0, 0, 240, 200], [50, 60, 70, 90], [300, 300, 320, 330]],  # the last one empty
    "b.png": [[5, 5, 60, 60], [30, 40, 200, 180]],
    "c.png": [[100, 10, 230, 120], [1, 100, 90, 199], [60, 60, 160, 160]],
}
VOCAB = ["astronaut", "flag", "rocket", "sky", "helmet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, photo):
    folder = tmp_path_factory.mktemp("images")
    for i, name in enumerate(sorted(BOXES)):
        Image.fromarray(np.ascontiguousarray(np.roll(photo, 37 * i, axis=1))).save(folder / name)
    boxes = folder / "boxes.json"
    boxes.write_text(json.dumps(BOXES))
    return str(folder), str(boxes)


@pytest.fixture(scope="module")
def store_dir(images, tmp_path_factory):
    folder, boxes = images
    out = str(tmp_path_factory.mktemp("store") / "regions")
    common = ["--config-file", TINY_CONFIG, "--image-dir", folder, "--boxes", boxes, "--output", out, "--masks"]
    store_tool.main(common + ["--max-images", "2"])  # interrupted after two images
    first = RegionStore(out)
    assert first.done_images() == {"a.png", "b.png"} and len(first.shards()) == 1
    store_tool.main(common)  # resumed: only c.png is computed
    return out


def test_resume_writes_each_image_once(store_dir):
    store = RegionStore(store_dir)
    keys = [r["key"] for r in store.images()]
    assert sorted(keys) == sorted(BOXES) and len(store.shards()) == 2
    m = store.manifest
    assert m["format"] == "regionspot-region-store" and set(m["fingerprints"]) == {"sam", "clip", "fusion"}


def test_rescore_equals_direct_run(store_dir, images):
    folder, _ = images
    torch.manual_seed(0)  # the tools' seed for the random stand-in head
    predictor = regionspot.RegionSpotPredictor(tiny_cfg())
    detections, per_image = rescore_tool.rescore(RegionStore(store_dir), predictor, VOCAB, list(range(1, 6)))
    assert predictor.class_names == VOCAB
    head = predictor.head
    by_key = {record["key"]: inst for record, inst in per_image}
    for name, boxes in BOXES.items():
        predictor.set_image(np.asarray(Image.open(os.path.join(folder, name)).convert("RGB")))
        out = predictor.predict(boxes)
        regions, classes, scores = head.selector(out["scores"], None, ~out["empty_box"])
        inst = by_key[name]
        assert torch.equal(inst.pred_classes, classes)
        torch.testing.assert_close(inst.scores, scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(inst.pred_boxes.tensor, torch.as_tensor(boxes, dtype=torch.float32)[regions])
    assert len(detections) == sum(len(inst) for _, inst in per_image)
    assert all(d["category_id"] in range(1, 6) and "segmentation" in d for d in detections)
    # the empty box of a.png (outside the image) gives no detection
    assert not any(d["bbox"][0] == 300 for d in detections)


def test_rescore_cli_writes_coco_json(store_dir, tmp_path):
    out = str(tmp_path / "dets.json")
    rescore_tool.main(["--config-file", TINY_CONFIG, "--store", store_dir, "--vocabulary", "cat,dog,tree", "--output", out])
    with open(out) as f:
        dets = json.load(f)
    assert dets and set(dets[0]) >= {"image_id", "category_id", "bbox", "score"}
    assert {d["category_id"] for d in dets} <= {1, 2, 3}


def test_stale_store_is_refused(store_dir, images):
    torch.manual_seed(7)  # another random head: other fusion weights
    predictor = regionspot.RegionSpotPredictor(tiny_cfg())
    current = model_fingerprints(predictor.head)
    stored = RegionStore(store_dir).manifest["fingerprints"]
    with pytest.raises(StaleStoreError) as e:
        rescore_tool.rescore(RegionStore(store_dir), predictor, VOCAB, list(range(1, 6)))
    assert stored["fusion"] in str(e.value) and current["fusion"] in str(e.value) and "sam" not in str(e.value).split("(")[1][:5]
    # writing more into it with other weights is refused as well (SEED seeds the tool's random head)
    folder, boxes = images
    with pytest.raises(StaleStoreError, match="fusion: store"):
        store_tool.main(["--config-file", TINY_CONFIG, "--image-dir", folder, "--boxes", boxes, "--output", store_dir,
                         "--masks", "SEED", "7"])
