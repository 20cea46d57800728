"""
The overlapped evaluation (the evaluator's ``process`` on a background thread, masks RLE-encoded
once per distinct mask, loader workers) gives exactly the results of detectron2's sequential one;
failures on the background thread reach the caller naming the image. Correctness only: the speed
is measured by ``tools/benchmark_eval.py``.
"""
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_lvis_json, register_lvis_instances
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json as d2_instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances

from conftest import tiny_cfg
from regionspot.data.shapes import SHAPES_CLASSES, SHAPES_SPLITS, generate_shapes_split
from regionspot.evaluation.evaluator import (
    EvaluationError,
    OverlappedEvaluator,
    build_regionspot_evaluator,
    encode_mask_rles,
    evaluate_datasets,
    instances_to_coco_json,
)

NUM_IMAGES = 5
COCO_SUBSET = "rs_test_throughput_shapes_val5"
LVIS_SUBSET = "rs_test_throughput_lvis_shapes_val5"
THREAD_NAME = "regionspot-evaluator"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # As tests/test_evaluation.py: the tiny models gain nothing from intra-op threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_thread_left():
    yield
    # Every evaluation, failed ones included, stops its background thread.
    assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]


# ------------------------------------------------------------------------------------------------
# Data: the first images of regionspot_shapes_val as a COCO-style and an LVIS-style dataset
def _write_lvis_json(dicts, path):
    images, annotations = [], []
    for d in dicts:
        cats = sorted({a["category_id"] + 1 for a in d["annotations"]})
        images.append({
            "id": d["image_id"] + 1,
            "file_name": os.path.basename(d["file_name"]),
            # detectron2's LVIS loader takes the split folder from the url.
            "coco_url": "http://images.example.org/val/" + os.path.basename(d["file_name"]),
            "height": d["height"],
            "width": d["width"],
            "not_exhaustive_category_ids": [],
            "neg_category_ids": [c for c in range(1, len(SHAPES_CLASSES) + 1) if c not in cats],
        })
        for a in d["annotations"]:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": d["image_id"] + 1,
                "category_id": a["category_id"] + 1,
                "bbox": list(BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYWH_ABS)),
                "area": a["area"],
                "segmentation": a["segmentation"],
            })
    categories = [
        {"id": c + 1, "name": name.replace(" ", "_"), "synset": name.replace(" ", "_") + ".n.01",
         "frequency": "rcf"[c % 3], "image_count": 1, "instance_count": 1}
        for c, name in enumerate(SHAPES_CLASSES)
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_throughput"))
    _, seed = SHAPES_SPLITS["val"]
    dicts = generate_shapes_split(root, "val", NUM_IMAGES, seed)
    DatasetCatalog.register(COCO_SUBSET, lambda: generate_shapes_split(root, "val", NUM_IMAGES, seed))
    MetadataCatalog.get(COCO_SUBSET).set(thing_classes=list(SHAPES_CLASSES), evaluator_type="coco")
    json_file = os.path.join(root, "lvis_shapes.json")
    _write_lvis_json(dicts, json_file)
    image_root = os.path.dirname(os.path.dirname(dicts[0]["file_name"])) + os.sep
    register_lvis_instances(LVIS_SUBSET, {"thing_classes": list(SHAPES_CLASSES)}, json_file, image_root)
    # Custom categories: loaded without the dataset name (see tests/test_evaluation.py's lvis_subset).
    DatasetCatalog.remove(LVIS_SUBSET)
    DatasetCatalog.register(LVIS_SUBSET, lambda: load_lvis_json(json_file, image_root))
    yield dicts
    for name in (COCO_SUBSET, LVIS_SUBSET):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(tmp_path, dataset, *opts):
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", (dataset,), "DATASETS.TRAIN", (), *opts)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    m.eval()
    return m


def _evaluate(model, cfg, dataset, overlap):
    """Results, the evaluator's per-image predictions and its results file of one evaluation."""
    evaluator = build_regionspot_evaluator(cfg, dataset, os.path.join(cfg.OUTPUT_DIR, "inference"))
    results = evaluate_datasets(cfg, model, evaluators=[evaluator], overlap=overlap)[dataset]
    results_file = "coco_instances_results.json" if isinstance(evaluator, COCOEvaluator) else "lvis_instances_results.json"
    with open(os.path.join(cfg.OUTPUT_DIR, "inference", results_file)) as f:
        written = f.read()
    # Compared as json text: the AP of a class without detections is NaN, which equals itself there.
    return json.dumps(results, sort_keys=True), json.dumps(evaluator._predictions), written, evaluator


# ------------------------------------------------------------------------------------------------
# 1. Same results as the sequential evaluation
@pytest.mark.parametrize("dataset", [COCO_SUBSET, LVIS_SUBSET])
@pytest.mark.parametrize("workers", [0, 2])
def test_overlapped_evaluation_equals_sequential(tmp_path, datasets, model, dataset, workers):
    seq = _evaluate(model, _cfg(tmp_path / "seq", dataset, "DATALOADER.NUM_WORKERS", 0), dataset, overlap=False)
    ovl = _evaluate(model, _cfg(tmp_path / "ovl", dataset, "DATALOADER.NUM_WORKERS", workers), dataset, overlap=True)
    assert seq[0] == ovl[0]  # AP dict
    assert seq[1] == ovl[1]  # per-image predictions, in order
    assert seq[2] == ovl[2]  # the results file
    results = json.loads(seq[0])
    assert set(results) == {"bbox", "segm"}
    # The masks were evaluated, and detections did share masks (the once-per-mask encoding ran).
    predictions = json.loads(seq[1])
    assert [p["image_id"] for p in predictions] == [d["image_id"] for d in DatasetCatalog.get(dataset)]
    detections = [x for p in predictions for x in p["instances"]]
    assert detections and all("segmentation" in x for x in detections)
    assert len({x["segmentation"]["counts"] for x in detections}) < len(detections)
    assert isinstance(ovl[3], COCOEvaluator if dataset == COCO_SUBSET else LVISEvaluator)


def test_train_net_test_overlaps_by_default(tmp_path, datasets, model, monkeypatch):
    """Trainer.test (train_net.py --eval-only, the evaluation hook) goes through OverlappedEvaluator."""
    seen = []
    original = OverlappedEvaluator.process

    def process(self, inputs, outputs):
        seen.append((threading.current_thread().name, inputs[0]["image_id"]))
        return original(self, inputs, outputs)

    monkeypatch.setattr(OverlappedEvaluator, "process", process)
    evaluate_datasets(_cfg(tmp_path, COCO_SUBSET, "MODEL.REGIONSPOT.MASK.ENABLED", False), model)
    assert [i for _, i in seen] == [d["image_id"] for d in datasets]


# ------------------------------------------------------------------------------------------------
# 2. The converter equals detectron2's
def _instances(masks, boxes, keypoints=None):
    k = len(boxes)
    inst = Instances(tuple(masks.shape[1:]) if masks is not None else (20, 30))
    inst.pred_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    g = torch.Generator().manual_seed(k)
    inst.scores = torch.rand(k, generator=g)
    inst.pred_classes = torch.randint(0, 5, (k,), generator=g)
    if masks is not None:
        inst.pred_masks = masks
    if keypoints is not None:
        inst.pred_keypoints = keypoints
    return inst


def _random_masks(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, generator=g) > 0.5


def _cases():
    h, w = 7, 13  # H * W odd: nothing relies on a word-sized mask
    base = _random_masks(4, h, w, 0)
    box = [[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 3.0, 3.0], [2.0, 1.0, 9.0, 4.0], [4.0, 4.0, 12.0, 6.0]]
    region = torch.tensor([0, 1, 0, 2, 3, 1, 0, 3, 2, 2])
    boxes = [box[i] for i in region]
    yield "shared masks of shared boxes", _instances(base[region], boxes)
    # The same box with different masks (e.g. two prompts at one box): never merged.
    yield "one box, different masks", _instances(_random_masks(6, h, w, 1), [box[0]] * 6)
    # Equal masks of different boxes: encoded separately, same RLE anyway.
    yield "different boxes, equal masks", _instances(base[[0, 0, 0]], box[:3])
    # More than the 4 compared candidates of a key.
    distinct = _random_masks(6, h, w, 2)
    yield "many masks per box", _instances(distinct[[0, 1, 2, 3, 4, 5, 5, 4, 0]], [box[0]] * 9)
    yield "uint8 masks", _instances(base[region].to(torch.uint8), boxes)
    # Values other than 0/1 reach pycocotools unchanged, as in detectron2.
    yield "uint8 0/255 masks", _instances(base[region].to(torch.uint8) * 255, boxes)
    yield "numpy masks", _instances(base[region].numpy(), boxes)
    yield "float masks (detectron2's function)", _instances(base[region].float() * 0.7, boxes)
    yield "all-empty and all-full masks", _instances(
        torch.stack([torch.zeros(h, w, dtype=torch.bool), torch.ones(h, w, dtype=torch.bool)] * 2), box[:2] * 2
    )
    yield "no masks", _instances(None, boxes)
    yield "no detections", _instances(torch.zeros(0, h, w, dtype=torch.bool), [])
    yield "keypoints (detectron2's function)", _instances(base, box, keypoints=torch.rand(4, 3, 3))


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_instances_to_coco_json_equals_detectron2(case):
    _, inst = case
    # detectron2's function edits the keypoints in place: each call gets its own copy.
    theirs = d2_instances_to_coco_json(_copy_instances(inst), 7)
    ours = instances_to_coco_json(_copy_instances(inst), 7)
    assert json.dumps(ours) == json.dumps(theirs)
    # Separate dicts per detection, as detectron2 gives (a caller may edit one).
    if ours and "segmentation" in ours[0]:
        assert len({id(x["segmentation"]) for x in ours}) == len(ours)
        assert len({id(x["segmentation"]["size"]) for x in ours}) == len(ours)


def _copy_instances(inst):
    out = Instances(inst.image_size)
    for k, v in inst.get_fields().items():
        if isinstance(v, Boxes):
            v = Boxes(v.tensor.clone())
        out.set(k, v.copy() if isinstance(v, np.ndarray) else v.clone())
    return out


def test_encode_mask_rles_equals_pycocotools_on_numpy():
    import pycocotools.mask as mask_util

    masks = _random_masks(5, 33, 17, 3).numpy()[[0, 1, 0, 4, 2, 1]]
    expected = [mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0] for m in masks]
    for e in expected:
        e["counts"] = e["counts"].decode()
    assert encode_mask_rles(masks, groups=[0, 1, 0, 4, 2, 1]) == expected
    assert encode_mask_rles(masks) == expected
    assert encode_mask_rles(masks[:0]) == []


# ------------------------------------------------------------------------------------------------
# 3. The background thread: order, bounded queue, failures
class _Recording(DatasetEvaluator):
    def __init__(self, fail_on=None, gate=None):
        self.fail_on, self.gate = fail_on, gate
        self.reset()

    def reset(self):
        self.seen, self.threads = [], set()

    def process(self, inputs, outputs):
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self.threads.add(threading.current_thread().name)
        for x in inputs:
            if x["image_id"] == self.fail_on:
                raise ValueError(f"cannot evaluate {x['image_id']}")
            time.sleep(0.001 * (x["image_id"] % 3))  # uneven work must not reorder anything
            self.seen.append(x["image_id"])

    def evaluate(self):
        return {"seen": list(self.seen)}


def _inputs(i):
    return [{"image_id": i, "file_name": f"/data/img_{i}.jpg"}]


def test_calls_are_processed_in_order_off_the_callers_thread():
    base = _Recording()
    ev = OverlappedEvaluator(base)
    ev.reset()
    for i in range(20):
        ev.process(_inputs(i), [{}])
    assert ev.evaluate() == {"seen": list(range(20))}
    assert base.threads == {THREAD_NAME}
    # reset() starts a new evaluation.
    ev.reset()
    ev.process(_inputs(5), [{}])
    assert ev.evaluate() == {"seen": [5]}


def test_queue_is_bounded():
    gate = threading.Event()
    ev = OverlappedEvaluator(_Recording(gate=gate), max_pending=2)
    ev.reset()
    for i in range(3):  # one taken by the blocked thread, two queued
        ev.process(_inputs(i), [{}])
    fourth = threading.Thread(target=ev.process, args=(_inputs(3), [{}]))
    fourth.start()
    fourth.join(timeout=0.3)
    assert fourth.is_alive()  # process() waits while max_pending calls are queued
    gate.set()
    fourth.join(timeout=30)
    assert not fourth.is_alive()
    assert ev.evaluate() == {"seen": [0, 1, 2, 3]}


def test_failure_names_the_image_at_the_next_call_or_evaluate():
    ev = OverlappedEvaluator(_Recording(fail_on=3))
    ev.reset()
    with pytest.raises(EvaluationError) as info:
        for i in range(50):
            ev.process(_inputs(i), [{}])
            time.sleep(0.002)
        ev.evaluate()
    err = info.value
    assert "image_id 3 (/data/img_3.jpg)" in str(err) and "ValueError: cannot evaluate 3" in str(err)
    assert err.image_ids == [3] and err.file_names == ["/data/img_3.jpg"]
    assert isinstance(err.__cause__, ValueError)
    # evaluate() raises it too (the evaluation is incomplete), and the thread is gone after.
    with pytest.raises(EvaluationError, match="image_id 3"):
        ev.evaluate()
    ev.close()
    # A new evaluation after reset() starts clean.
    ev.reset()
    ev.process(_inputs(1), [{}])
    assert ev.evaluate() == {"seen": [1]}


def test_failure_in_evaluate_datasets_names_the_image(tmp_path, datasets, model):
    target = datasets[2]
    cfg = _cfg(tmp_path, COCO_SUBSET, "MODEL.REGIONSPOT.MASK.ENABLED", False, "DATALOADER.NUM_WORKERS", 2)
    with pytest.raises(EvaluationError) as info:
        evaluate_datasets(cfg, model, evaluators=[_Recording(fail_on=target["image_id"])])
    message = str(info.value)
    assert f"image_id {target['image_id']!r}" in message and target["file_name"] in message
    assert isinstance(info.value.__cause__, ValueError)


def test_failure_of_the_model_stops_the_thread(tmp_path, datasets, model, monkeypatch):
    calls = {"n": 0}
    forward = model.forward

    def failing_forward(batched_inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("model failed")
        return forward(batched_inputs)

    monkeypatch.setattr(model, "forward", failing_forward)
    cfg = _cfg(tmp_path, COCO_SUBSET, "MODEL.REGIONSPOT.MASK.ENABLED", False)
    with pytest.raises(RuntimeError, match="model failed"):
        evaluate_datasets(cfg, model)
    # _no_thread_left checks that the background thread was stopped.


# ------------------------------------------------------------------------------------------------
# 4. Loader workers
def test_loader_workers_capped_at_usable_cpus(tmp_path, datasets, monkeypatch):
    from regionspot.data import mappers

    monkeypatch.setattr(mappers, "usable_cpus", lambda: 2)
    for asked, built in ((4, 2), (2, 2), (1, 1), (0, 0)):
        cfg = _cfg(tmp_path, COCO_SUBSET, "DATALOADER.NUM_WORKERS", asked)
        assert mappers.build_regionspot_test_loader(cfg, COCO_SUBSET).num_workers == built
    with pytest.raises(ValueError, match="NUM_WORKERS=-1"):
        mappers.evaluation_loader_workers(-1)
