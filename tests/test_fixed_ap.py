"""
LVIS fixed AP (top K detections per category over the dataset, no per-image cap) on hand-made
LVIS-format ground truth: values worked out by hand, equality with a plain re-implementation,
streaming compaction, and 2 processes (gloo) against 1.
"""
import json
import logging
import math
import os
import random
import subprocess
import sys
import textwrap
from collections import defaultdict

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_lvis_instances
from detectron2.evaluation import LVISEvaluator
from detectron2.structures import Boxes, Instances

from conftest import REPO_ROOT
from regionspot.data.lvis import patch_lvis_numpy
from regionspot.evaluation.fixed_ap import METRICS, RESULTS_FILE, LVISFixedAPEvaluator

patch_lvis_numpy()  # these tests run detectron2's LVISEvaluator and the LVIS API directly

# ------------------------------------------------------------------------------------------------
# Ground truth by hand: 4 images of 200 x 200, one category per frequency group. The category ids
# are not contiguous on purpose, so the contiguous -> LVIS id mapping is exercised.
RARE, COMMON, FREQUENT = 3, 7, 12
CONTIGUOUS = {RARE: 0, COMMON: 1, FREQUENT: 2}
HAND = "rs_test_fixed_ap_hand"
HAND_NO_MAPPING = "rs_test_fixed_ap_hand_no_mapping"

# [x, y, w, h]; the detection boxes below either equal a GT box (IoU 1) or miss all (IoU 0), so AP
# is the same at every IoU threshold.
GT_FREQUENT_1 = [10.0, 10.0, 40.0, 40.0]  # image 1, area 1600 (medium)
GT_FREQUENT_2 = [10.0, 10.0, 40.0, 40.0]  # image 2
GT_COMMON = [50.0, 50.0, 60.0, 60.0]  # image 3, area 3600 (medium)
GT_RARE = [20.0, 20.0, 30.0, 30.0]  # image 4, area 900 (small)
MISS_A = [120.0, 120.0, 40.0, 40.0]
MISS_B = [150.0, 10.0, 40.0, 40.0]
MISS_SMALL = [150.0, 150.0, 30.0, 30.0]

# (image_id, category_id, score, xywh)
HAND_DETECTIONS = [
    # frequent: FP, TP, FP, TP, FP by score
    (1, FREQUENT, 0.9, MISS_A),
    (1, FREQUENT, 0.8, GT_FREQUENT_1),
    (2, FREQUENT, 0.7, MISS_A),
    (2, FREQUENT, 0.6, GT_FREQUENT_2),
    (1, FREQUENT, 0.5, MISS_B),
    # common: one TP -> AP 1
    (3, COMMON, 0.4, GT_COMMON),
    # rare: FP, TP -> precision 1/2 at recall 1 -> AP 1/2
    (4, RARE, 0.35, MISS_SMALL),
    (4, RARE, 0.3, GT_RARE),
]

# AP of the frequent category. All 5 detections: recall 1/2 at precision 1/2 and recall 1 at
# precision 2/4, so the interpolated precision is 1/2 at all 101 recall thresholds: AP 1/2.
# Top 3 only (FP, TP, FP): recall stops at 1/2; precision is 1/2 at the 51 thresholds
# 0.00, ..., 0.50 and 0 at the other 50: AP = 0.5 * 51 / 101.
FREQUENT_AP_ALL = 0.5
FREQUENT_AP_TOP3 = 0.5 * 51 / 101
COMMON_AP = 1.0
RARE_AP = 0.5


def _category(category_id, frequency):
    return {"id": category_id, "name": f"thing_{category_id}", "synonyms": [f"thing_{category_id}"],
            "frequency": frequency, "image_count": 1, "instance_count": 1, "def": "a made-up thing"}


def _image(image_id, width=200, height=200, neg=(), not_exhaustive=()):
    return {"id": image_id, "width": width, "height": height, "file_name": f"{image_id:06d}.jpg",
            "coco_url": f"http://images.invalid/val2017/{image_id:012d}.jpg",
            "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(not_exhaustive)}


def _annotation(annotation_id, image_id, category_id, box):
    x, y, w, h = box
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": list(box),
            "area": w * h, "segmentation": [[x, y, x, y + h, x + w, y + h, x + w, y]]}


def _register(name, json_file, metadata):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_instances(name, metadata, str(json_file), os.path.dirname(str(json_file)))


def _unregister(*names):
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory):
    """The hand-made GT, registered twice: with a category mapping and (HAND_NO_MAPPING) without."""
    root = tmp_path_factory.mktemp("fixed_ap_hand")
    gt = {
        "info": {}, "licenses": [],
        "categories": [_category(RARE, "r"), _category(COMMON, "c"), _category(FREQUENT, "f")],
        # image 3 is verified to hold no frequent thing; image 4 to hold no common thing
        "images": [_image(1), _image(2), _image(3, neg=[FREQUENT]), _image(4, neg=[COMMON])],
        "annotations": [
            _annotation(1, 1, FREQUENT, GT_FREQUENT_1),
            _annotation(2, 2, FREQUENT, GT_FREQUENT_2),
            _annotation(3, 3, COMMON, GT_COMMON),
            _annotation(4, 4, RARE, GT_RARE),
        ],
    }
    json_file = root / "lvis_hand.json"
    json_file.write_text(json.dumps(gt))
    # detectron2 fills neither thing_classes nor thing_dataset_id_to_contiguous_id for an LVIS
    # registration under a custom name, so the test gives them.
    _register(HAND, json_file, {"thing_classes": ["rare", "common", "frequent"],
                                "thing_dataset_id_to_contiguous_id": dict(CONTIGUOUS)})
    _register(HAND_NO_MAPPING, json_file, {})
    yield HAND
    _unregister(HAND, HAND_NO_MAPPING)


# ------------------------------------------------------------------------------------------------
# Helpers
def _batches(detections, contiguous=CONTIGUOUS, with_masks=False):
    """(inputs, outputs) of one image each, from (image_id, category_id, score, xywh) in the given order."""
    per_image = defaultdict(list)
    for image_id, category_id, score, (x, y, w, h) in detections:
        per_image[image_id].append((contiguous[category_id], score, [x, y, x + w, y + h]))
    batches = []
    for image_id, rows in per_image.items():
        instances = Instances((200, 200))
        instances.pred_boxes = Boxes(torch.tensor([r[2] for r in rows], dtype=torch.float32))
        instances.scores = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        instances.pred_classes = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        if with_masks:
            instances.pred_masks = torch.ones(len(rows), 200, 200, dtype=torch.bool)
        batches.append(([{"image_id": image_id}], [{"instances": instances}]))
    return batches


def _run(evaluator, detections, **kwargs):
    evaluator.reset()
    for inputs, outputs in _batches(detections, **kwargs):
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def _fixed_ap(dataset, detections, k, **kwargs):
    return _run(LVISFixedAPEvaluator(dataset, topk_per_class=k, **kwargs), detections)["bbox-fixed"]


def _same(a, b):
    """Equal metric dicts, NaN equal to NaN."""
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], (key, a[key], b[key])


# ------------------------------------------------------------------------------------------------
# a) values by hand
@pytest.mark.parametrize("k, frequent_ap", [(3, FREQUENT_AP_TOP3), (5, FREQUENT_AP_ALL), (10000, FREQUENT_AP_ALL)])
def test_per_class_cut_by_hand(hand_dataset, k, frequent_ap):
    # K = 3 cuts only the frequent category (5 detections); the others have 1 and 2.
    metrics = _fixed_ap(hand_dataset, HAND_DETECTIONS, k, distributed=False)
    assert metrics["APf"] == pytest.approx(100 * frequent_ap, abs=1e-9)
    assert metrics["APc"] == pytest.approx(100 * COMMON_AP, abs=1e-9)
    assert metrics["APr"] == pytest.approx(100 * RARE_AP, abs=1e-9)
    assert metrics["AP"] == pytest.approx(100 * (frequent_ap + COMMON_AP + RARE_AP) / 3, abs=1e-9)
    # every match has IoU 1 and every miss IoU 0
    assert metrics["AP50"] == pytest.approx(metrics["AP"], abs=1e-9)
    assert metrics["AP75"] == pytest.approx(metrics["AP"], abs=1e-9)
    # only the rare GT box is small; the frequent and common ones are medium; none is large
    assert metrics["APs"] == pytest.approx(100 * RARE_AP, abs=1e-9)
    assert metrics["APm"] == pytest.approx(100 * (frequent_ap + COMMON_AP) / 2, abs=1e-9)
    assert math.isnan(metrics["APl"])


def _with_distractors(where):
    """
    The hand detections plus 300 confident rare-category detections on images 1 and 2, where the
    rare category is neither annotated nor verified absent, so LVIS ignores them. ``where``:
    "crowded" puts all 300 on image 1, "spread" 150 on each.
    """
    images = [1] * 300 if where == "crowded" else [1, 2] * 150
    distractors = [(image_id, RARE, 0.95, [60.0 + i % 50, 60.0, 20.0, 20.0]) for i, image_id in enumerate(images)]
    return distractors + HAND_DETECTIONS


def test_fixed_ap_ignores_how_detections_spread_over_images(hand_dataset):
    standard = {}
    for where in ("crowded", "spread"):
        evaluator = LVISEvaluator(hand_dataset, distributed=False)  # 300 detections per image
        standard[where] = _run(evaluator, _with_distractors(where))["bbox"]
        fixed = _fixed_ap(hand_dataset, _with_distractors(where), 10000, distributed=False)
        # fixed AP: the distractors take nothing from the frequent category, wherever they are
        assert fixed["APf"] == pytest.approx(100 * FREQUENT_AP_ALL, abs=1e-9)
        assert fixed["AP"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    # Standard LVIS AP: spread out, nothing is cut and it agrees with fixed AP ...
    assert standard["spread"]["AP"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    # ... crowded onto image 1, they fill its 300 slots and push out the 3 frequent detections of
    # image 1 (0.9 FP, 0.8 TP, 0.5 FP): what is left (0.7 FP, 0.6 TP) scores 0.5 * 51 / 101.
    assert standard["crowded"]["APf"] == pytest.approx(100 * 0.5 * 51 / 101, abs=1e-9)
    assert standard["crowded"]["AP"] == pytest.approx(100 * (0.5 * 51 / 101 + 1.5) / 3, abs=1e-9)


def test_masks_ignored_results_file_and_fallback_mapping(hand_dataset, tmp_path):
    expected = _fixed_ap(hand_dataset, HAND_DETECTIONS, 3, distributed=False)
    evaluator = LVISFixedAPEvaluator(hand_dataset, topk_per_class=3, output_dir=str(tmp_path), distributed=False)
    _same(_run(evaluator, HAND_DETECTIONS, with_masks=True)["bbox-fixed"], expected)
    with open(tmp_path / RESULTS_FILE) as f:
        saved = json.load(f)
    # the top 3 frequent detections, the common one and both rare ones; XYWH boxes, LVIS ids,
    # ordered by image and then by position in the image's output
    kept = [d for d in HAND_DETECTIONS if not (d[1] == FREQUENT and d[2] < 0.7)]
    by_image = sorted(kept, key=lambda d: d[0])
    assert [(d["image_id"], d["category_id"], d["bbox"]) for d in saved] == [(d[0], d[1], d[3]) for d in by_image]
    assert [d["score"] for d in saved] == [float(np.float32(d[2])) for d in by_image]
    # Without thing_dataset_id_to_contiguous_id, contiguous id i is the i-th smallest category id,
    # which is what CONTIGUOUS is.
    _same(_fixed_ap(HAND_NO_MAPPING, HAND_DETECTIONS, 3, distributed=False), expected)


def test_no_detections_warns_and_gives_nan(hand_dataset, caplog):
    evaluator = LVISFixedAPEvaluator(hand_dataset, topk_per_class=3)
    # attached to the module's logger itself, in case a "regionspot" logger stops propagation
    module_logger = logging.getLogger("regionspot.evaluation.fixed_ap")
    module_logger.addHandler(caplog.handler)
    try:
        evaluator.reset()
        evaluator.process([{"image_id": 1}], [{"instances": Instances((200, 200), pred_boxes=Boxes(torch.zeros(0, 4)),
                                                                      scores=torch.zeros(0),
                                                                      pred_classes=torch.zeros(0, dtype=torch.int64))}])
        metrics = evaluator.evaluate()["bbox-fixed"]
        assert set(metrics) == set(METRICS) and all(math.isnan(v) for v in metrics.values())
        assert "No detections in 1 images" in caplog.text
        evaluator.reset()
        assert evaluator.evaluate() == {}
        assert "Did not receive any image" in caplog.text
    finally:
        module_logger.removeHandler(caplog.handler)


def test_unknown_class_is_an_error(hand_dataset):
    evaluator = LVISFixedAPEvaluator(hand_dataset, topk_per_class=3)
    with pytest.raises(ValueError, match="no category"):
        _run(evaluator, [(1, "bogus", 0.5, MISS_A)], contiguous={"bogus": 3})


# ------------------------------------------------------------------------------------------------
# b) a random federated case against a plain re-implementation: sort each category's detections,
# keep the top K, hand them to the lvis API with no per-image cap.
RANDOM_CATEGORIES = {2: "r", 4: "c", 5: "f", 9: "r", 11: "c", 13: "f"}


def _random_case(root, seed, num_images=8, detections_per_image=(0, 40)):
    """A random LVIS-format GT json and detections on it (boxes on a quarter-pixel grid, exact in float32)."""
    rng = random.Random(seed)
    category_ids = sorted(RANDOM_CATEGORIES)

    def box(width, height):
        w, h = rng.randint(32, 480) / 4, rng.randint(32, 480) / 4
        return [rng.randint(0, int(4 * (width - w))) / 4, rng.randint(0, int(4 * (height - h))) / 4, w, h]

    images, annotations = [], []
    for image_id in range(10, 10 + num_images):
        width, height = rng.randint(150, 300), rng.randint(150, 300)
        present = rng.sample(category_ids, rng.randint(1, 3))
        for category_id in present:
            for _ in range(rng.randint(1, 3)):
                annotations.append(_annotation(len(annotations) + 1, image_id, category_id, box(width, height)))
        absent = [c for c in category_ids if c not in present]
        images.append(_image(image_id, width, height, neg=rng.sample(absent, rng.randint(0, len(absent))),
                             not_exhaustive=rng.sample(present, rng.randint(0, 1))))
    categories = [_category(c, RANDOM_CATEGORIES[c]) for c in category_ids]
    json_file = root / f"lvis_random_{seed}.json"
    json_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                                     "categories": categories}))

    detections = []
    for image in images:
        gt_boxes = [a for a in annotations if a["image_id"] == image["id"]]
        for _ in range(rng.randint(*detections_per_image)):
            if rng.random() < 0.5:
                gt = rng.choice(gt_boxes)
                x, y, w, h = gt["bbox"]
                jitter = [rng.randint(-8, 8) / 4 for _ in range(4)]
                xywh = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
                category_id = gt["category_id"] if rng.random() < 0.7 else rng.choice(category_ids)
            else:
                xywh, category_id = box(image["width"], image["height"]), rng.choice(category_ids)
            detections.append((image["id"], category_id, float(np.float32(rng.random())), xywh))
    return json_file, detections


def _plain_fixed_ap(json_file, detections, k):
    from lvis import LVIS, LVISEval, LVISResults

    by_category = defaultdict(list)
    for image_id, category_id, score, xywh in detections:
        by_category[category_id].append({"image_id": image_id, "category_id": category_id, "score": score,
                                         "bbox": list(xywh)})
    kept = [d for dets in by_category.values() for d in sorted(dets, key=lambda d: -d["score"])[:k]]
    gt = LVIS(str(json_file))
    lvis_eval = LVISEval(gt, LVISResults(gt, [dict(d) for d in kept], max_dets=-1), iou_type="bbox")
    lvis_eval.params.max_dets = -1
    lvis_eval.run()
    results = lvis_eval.get_results()
    return {m: 100 * float(results[m]) if results[m] >= 0 else float("nan") for m in METRICS}, kept


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_plain_top_k_then_lvis_api(tmp_path, seed):
    json_file, detections = _random_case(tmp_path, seed)
    k = 6
    assert len({d[2] for d in detections}) == len(detections)  # no ties: the kept set is unambiguous
    counts = defaultdict(int)
    for d in detections:
        counts[d[1]] += 1
    assert max(counts.values()) > 2 * k  # the cut matters
    name = f"rs_test_fixed_ap_random_{seed}"
    _register(name, json_file, {})
    try:
        contiguous = {c: i for i, c in enumerate(sorted(RANDOM_CATEGORIES))}
        evaluator = LVISFixedAPEvaluator(name, topk_per_class=k, output_dir=str(tmp_path), compact_rows=5)
        ours = _run(evaluator, detections, contiguous=contiguous)["bbox-fixed"]
        reference, kept = _plain_fixed_ap(json_file, detections, k)
        _same(ours, reference)
        assert ours["AP"] > 0
        with open(tmp_path / RESULTS_FILE) as f:
            saved = json.load(f)

        def key(d):
            return d["image_id"], d["category_id"], d["score"], tuple(d["bbox"])

        assert sorted(map(key, saved)) == sorted(map(key, kept))
    finally:
        _unregister(name)


# ------------------------------------------------------------------------------------------------
# c) streaming compaction == one-shot selection, for any buffer size and arrival order
def _tied_detections(seed, num_images=30, num_classes=4):
    """Detections with many equal scores (0.1 steps) and up to 12 per image."""
    rng = random.Random(seed)
    detections = []
    for image_id in rng.sample(range(100, 200), num_images):
        for _ in range(rng.randint(0, 12)):
            x, y = rng.randint(0, 150), rng.randint(0, 150)
            detections.append((image_id, rng.randrange(num_classes), rng.randint(1, 5) / 10,
                               [float(x), float(y), 20.0, 30.0]))
    return detections


def _one_shot_selection(detections, k):
    """Plain Python: number each detection within its image, sort by (class, -score, image, position), cut."""
    position = defaultdict(int)
    rows = []
    for image_id, category, score, (x, y, w, h) in detections:
        rows.append((category, -float(np.float32(score)), image_id, position[image_id], (x, y, x + w, y + h)))
        position[image_id] += 1
    rows.sort(key=lambda r: r[:4])
    taken = defaultdict(int)
    kept = []
    for row in rows:
        if taken[row[0]] < k:
            taken[row[0]] += 1
            kept.append(row)
    return kept


@pytest.mark.parametrize("compact_rows", [1, 2, 7, 64, 10**9])
@pytest.mark.parametrize("k", [1, 5])
def test_streaming_compaction_equals_one_shot(hand_dataset, compact_rows, k):
    detections = _tied_detections(seed=compact_rows + k)
    contiguous = {c: c for c in range(4)}
    expected = _one_shot_selection(detections, k)
    batches = _batches(detections, contiguous=contiguous)
    largest_image = max(len(outputs[0]["instances"]) for _, outputs in batches)
    for order in ("as generated", "reversed"):
        evaluator = LVISFixedAPEvaluator(hand_dataset, topk_per_class=k, compact_rows=compact_rows)
        evaluator.reset()
        held = []
        for inputs, outputs in batches if order == "as generated" else batches[::-1]:
            evaluator.process(inputs, outputs)
            held.append(evaluator.num_rows_held)
        # bounded: the selection (<= classes * K) plus a buffer of at most max(compact_rows,
        # selection) and one image's rows
        assert max(held) <= 4 * k + max(compact_rows, 4 * k) + largest_image
        if compact_rows < len(detections):
            assert max(held) < len(detections)
        selected = evaluator.selected_detections()
        got = [(c, -s, i, p, tuple(b)) for c, s, i, p, b in zip(
            selected["category"].tolist(), selected["score"].tolist(), selected["image_id"].tolist(),
            selected["position"].tolist(), selected["box"].tolist())]
        assert got == expected, order


# ------------------------------------------------------------------------------------------------
# d) 2 processes (detectron2's launch, gloo on CPU), each with half of the images, equal 1 process
_WORKER = textwrap.dedent(
    """
    import json
    import os
    import sys

    import numpy as np
    import torch
    from detectron2.data.datasets import register_lvis_instances
    from detectron2.engine import launch
    from detectron2.structures import Boxes, Instances
    from detectron2.utils import comm

    import regionspot  # noqa: F401
    from regionspot.evaluation.fixed_ap import LVISFixedAPEvaluator


    def main(json_file, detections_file, out_dir, k):
        register_lvis_instances("rs_test_fixed_ap_dist", {}, json_file, os.path.dirname(json_file))
        data = np.load(detections_file)
        image_ids = sorted(set(data["image_id"].tolist()))
        evaluator = LVISFixedAPEvaluator("rs_test_fixed_ap_dist", topk_per_class=int(k), output_dir=out_dir,
                                         compact_rows=3)
        evaluator.reset()
        for image_id in image_ids[comm.get_rank()::comm.get_world_size()]:
            rows = data["image_id"] == image_id
            instances = Instances((300, 300), pred_boxes=Boxes(torch.from_numpy(data["box"][rows])),
                                  scores=torch.from_numpy(data["score"][rows]),
                                  pred_classes=torch.from_numpy(data["category"][rows]))
            evaluator.process([{"image_id": image_id}], [{"instances": instances}])
        results = evaluator.evaluate()
        if comm.is_main_process():
            with open(os.path.join(out_dir, "metrics.json"), "w") as f:
                json.dump(results, f)
        else:
            assert results is None


    if __name__ == "__main__":
        from functools import partial

        from regionspot.engine import run_then_close

        launch(partial(run_then_close, main), int(sys.argv[1]), dist_url="auto", args=tuple(sys.argv[2:]))
    """
)


def test_two_processes_equal_one(tmp_path):
    json_file, detections = _random_case(tmp_path, seed=7, detections_per_image=(5, 40))
    # equal scores across images, so the tie-break has to agree across processes
    detections = [(i, c, round(s * 4) / 4, b) for i, c, s, b in detections]
    k = 5
    contiguous = {c: i for i, c in enumerate(sorted(RANDOM_CATEGORIES))}
    np.savez(tmp_path / "detections.npz",
             image_id=np.array([d[0] for d in detections], np.int64),
             category=np.array([contiguous[d[1]] for d in detections], np.int64),
             score=np.array([d[2] for d in detections], np.float32),
             box=np.array([[x, y, x + w, y + h] for _, _, _, (x, y, w, h) in detections], np.float32))
    script = tmp_path / "fixed_ap_worker.py"
    script.write_text(_WORKER)
    out_two = tmp_path / "two"
    out_two.mkdir()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, str(script), "2", str(json_file), str(tmp_path / "detections.npz"),
                          str(out_two), str(k)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]

    name = "rs_test_fixed_ap_one"
    _register(name, json_file, {})
    out_one = tmp_path / "one"
    try:
        evaluator = LVISFixedAPEvaluator(name, topk_per_class=k, output_dir=str(out_one))
        one = _run(evaluator, detections, contiguous=contiguous)
    finally:
        _unregister(name)
    with open(out_two / "metrics.json") as f:
        two = json.load(f)
    assert list(two) == ["bbox-fixed"]
    _same(one["bbox-fixed"], two["bbox-fixed"])
    assert one["bbox-fixed"]["AP"] > 0
    saved_one = json.loads((out_one / RESULTS_FILE).read_text())
    saved_two = json.loads((out_two / RESULTS_FILE).read_text())
    assert len(saved_one) == 5 * len(RANDOM_CATEGORIES) and saved_one == saved_two
