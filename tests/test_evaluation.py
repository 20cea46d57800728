"""
End-to-end evaluation with detectron2's stock evaluators on constructed cases (CPU).

The tiny model has random weights, so the recognition itself is replaced by an oracle: the
head's ``logits`` are made to return ``100 * one_hot(class of the GT box that best overlaps each
region)``. Everything else (data loading with annotations / proposals, SAM masks, detection
selection, box scores, post-processing, COCO and LVIS evaluation) runs for real, so AP must come
out exactly 100 (and 0 with an anti-oracle).
"""
import json
import math
import os
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_lvis_json, register_lvis_instances
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, pairwise_iou

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg
from regionspot.data import detections_to_proposals, save_proposals
from regionspot.data.shapes import SHAPES_CLASSES, SHAPES_SPLITS, generate_shapes_split
from regionspot.engine import Trainer

NUM_IMAGES = 6
SUBSET = "rs_test_eval_shapes_val6"
LVIS_SUBSET = "rs_test_eval_lvis_shapes_val6"
NUM_CLASSES = len(SHAPES_CLASSES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning
    # threads can make inference many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# Data: the first 6 images of regionspot_shapes_val, generated into a temp dir
@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """
    Register the first NUM_IMAGES images of ``regionspot_shapes_val`` as ``SUBSET`` (same metadata).

    Image i of a shapes split depends only on (seed, i), so generating NUM_IMAGES images with the
    val seed gives exactly the first images of ``regionspot_shapes_val`` without writing into the
    repository's ``datasets/``.
    """
    root = str(tmp_path_factory.mktemp("shapes_eval"))
    _, seed = SHAPES_SPLITS["val"]
    dicts = generate_shapes_split(root, "val", NUM_IMAGES, seed)
    assert len(dicts) == NUM_IMAGES
    assert all(len(d["annotations"]) > 0 for d in dicts)
    if SUBSET not in DatasetCatalog.list():
        DatasetCatalog.register(SUBSET, lambda: generate_shapes_split(root, "val", NUM_IMAGES, seed))
        val_meta = MetadataCatalog.get("regionspot_shapes_val")
        MetadataCatalog.get(SUBSET).set(thing_classes=list(val_meta.thing_classes), evaluator_type="coco")
    yield dicts
    DatasetCatalog.remove(SUBSET)
    MetadataCatalog.remove(SUBSET)


def _make_cfg(tmp_path, *opts):
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", (SUBSET,), *opts)
    cfg.freeze()
    return cfg


def _build(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# The oracle
def _install_oracle(monkeypatch, model, shift=0, scale=100.0):
    """
    Make the head's classifier (``model.roi_heads.classifier``) return ``scale * one_hot((c + shift) % C)`` for each region,
    where ``c`` is the class of the GT box with the highest IoU to that region.

    ``model._regions`` is wrapped to stash, per image, the GT boxes/classes and the region boxes
    in a FIFO that the classifier pops (the head calls it once per image, in order).

    Returns:
        dict with "calls" (number of images seen by ``logits``).
    """
    pending = deque()
    stats = {"calls": 0}
    original_regions = model._regions

    def regions(batched_inputs, images=None):
        out = original_regions(batched_inputs, images)
        for x, r in zip(batched_inputs, out):
            gt = x["instances"]
            pending.append((gt.gt_boxes.to("cpu"), gt.gt_classes.to("cpu"), r.proposal_boxes.to("cpu")))
        return out

    def logits(region_embeddings, vocabulary=None):
        gt_boxes, gt_classes, region_boxes = pending.popleft()
        n = region_embeddings.shape[0]
        assert region_embeddings.dim() == 2 and n == len(region_boxes)
        c = model.roi_heads.num_classes
        if n == 0 or len(gt_boxes) == 0:
            return region_embeddings.new_zeros(n, c)
        best = pairwise_iou(region_boxes, gt_boxes).argmax(dim=1)
        target = (gt_classes[best] + shift) % c
        onehot = torch.nn.functional.one_hot(target, c).to(region_embeddings)
        stats["calls"] += 1
        return scale * onehot

    monkeypatch.setattr(model, "_regions", regions)
    monkeypatch.setattr(model.roi_heads.classifier, "forward", logits)
    return stats


def _first_input(cfg, dataset_name=SUBSET):
    loader = Trainer.build_test_loader(cfg, dataset_name)
    return next(iter(loader))


# ------------------------------------------------------------------------------------------------
# 1. COCO evaluator, GT-box protocol
def test_coco_gt_boxes_oracle_gives_ap_100(tmp_path, subset, monkeypatch):
    cfg = _make_cfg(tmp_path)
    model = _build(cfg)
    assert isinstance(Trainer.build_evaluator(cfg, SUBSET), COCOEvaluator)
    stats = _install_oracle(monkeypatch, model)
    results = Trainer.test(cfg, model)
    assert list(results) == [SUBSET]
    res = results[SUBSET]
    assert stats["calls"] == NUM_IMAGES
    assert set(res) == {"bbox", "segm"}  # MASK.ENABLED: SAM masks are evaluated too
    assert res["bbox"]["AP"] == pytest.approx(100.0, abs=1e-3)
    assert res["bbox"]["AP50"] == pytest.approx(100.0, abs=1e-3)
    # Masks of random SAM weights: any finite number in [0, 100].
    assert math.isfinite(res["segm"]["AP"]) and 0.0 <= res["segm"]["AP"] <= 100.0
    # detectron2's COCO json of the dataset and the results were written under OUTPUT_DIR.
    inference_dir = tmp_path / "inference" / SUBSET
    assert (inference_dir / "coco_instances_results.json").is_file()


def test_coco_mask_off_evaluates_bbox_only(tmp_path, subset, monkeypatch):
    cfg = _make_cfg(tmp_path, "MODEL.REGIONSPOT.MASK.ENABLED", False)
    model = _build(cfg)
    _install_oracle(monkeypatch, model)
    res = Trainer.test(cfg, model)[SUBSET]
    assert set(res) == {"bbox"}
    assert res["bbox"]["AP"] == pytest.approx(100.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# 2. Anti-oracle
def test_coco_anti_oracle_gives_ap_0(tmp_path, subset, monkeypatch):
    # A large scale makes every other class's probability exactly 0 in float32, so with
    # SCORE_THRESH_TEST 0 each region is kept with its (wrong) shifted class only.
    cfg = _make_cfg(tmp_path, "MODEL.REGIONSPOT.MASK.ENABLED", False)
    model = _build(cfg)
    _install_oracle(monkeypatch, model, shift=1, scale=1e4)
    res = Trainer.test(cfg, model)[SUBSET]
    assert res["bbox"]["AP"] == pytest.approx(0.0, abs=1e-3)


def test_coco_anti_oracle_per_region_gives_ap_0(tmp_path, subset, monkeypatch):
    # per_region keeps only each region's best class, whatever the other probabilities.
    cfg = _make_cfg(tmp_path, "MODEL.REGIONSPOT.MASK.ENABLED", False, "MODEL.REGIONSPOT.SCORE.MODE", "per_region")
    model = _build(cfg)
    _install_oracle(monkeypatch, model, shift=1)
    res = Trainer.test(cfg, model)[SUBSET]
    assert res["bbox"]["AP"] == pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# 3. Scoring modes
def test_per_region_oracle_gives_ap_100(tmp_path, subset, monkeypatch):
    cfg = _make_cfg(tmp_path, "MODEL.REGIONSPOT.MASK.ENABLED", False, "MODEL.REGIONSPOT.SCORE.MODE", "per_region")
    model = _build(cfg)
    _install_oracle(monkeypatch, model)
    res = Trainer.test(cfg, model)[SUBSET]
    assert res["bbox"]["AP"] == pytest.approx(100.0, abs=1e-3)

    # One detection per GT box, with its GT class.
    batch = _first_input(cfg)
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    gt = batch[0]["instances"]
    assert len(out) == len(gt)
    order = pairwise_iou(out.pred_boxes, gt.gt_boxes).argmax(dim=1)
    assert torch.equal(out.pred_classes, gt.gt_classes[order])
    assert torch.allclose(out.scores, torch.ones(len(out)))


@pytest.mark.parametrize("topk,max_dets", [(100, 100), (4, 100), (100, 3)])
def test_topk_pairs_detection_count(tmp_path, subset, topk, max_dets):
    # Random weights: every (region, class) probability is > 0, so nothing is thresholded away.
    cfg = _make_cfg(
        tmp_path,
        "MODEL.REGIONSPOT.MASK.ENABLED", False,
        "MODEL.REGIONSPOT.SCORE.MODE", "topk_pairs",
        "MODEL.REGIONSPOT.SCORE.TOPK", topk,
        "TEST.DETECTIONS_PER_IMAGE", max_dets,
    )
    model = _build(cfg)
    batch = _first_input(cfg)
    n = len(batch[0]["instances"])
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    assert len(out) == min(topk, n * NUM_CLASSES, max_dets)
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    # (region, class) pairs are distinct.
    pairs = {(tuple(b.tolist()), int(c)) for b, c in zip(out.pred_boxes.tensor, out.pred_classes)}
    assert len(pairs) == len(out)


# ------------------------------------------------------------------------------------------------
# 4. Proposals protocol
def _write_proposals(dicts, path, extra_per_image=3, seed=0):
    """GT boxes with score 0.9 and random boxes far from every GT box with score 0.1."""
    rng = np.random.default_rng(seed)
    detections = []
    num_extra = {}
    for d in dicts:
        gts = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYWH_ABS) for a in d["annotations"]]
        for b in gts:
            detections.append({"image_id": d["image_id"], "category_id": 1, "bbox": list(b), "score": 0.9})
        gt_xyxy = Boxes(torch.tensor([BoxMode.convert(b, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for b in gts]))
        added = 0
        for _ in range(1000):
            if added == extra_per_image:
                break
            w, h = rng.uniform(8, 30, size=2)
            x, y = rng.uniform(0, d["width"] - w), rng.uniform(0, d["height"] - h)
            box = Boxes(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32))
            if pairwise_iou(box, gt_xyxy).max() < 0.1:
                detections.append(
                    {"image_id": d["image_id"], "category_id": 1, "bbox": [x, y, w, h], "score": 0.1}
                )
                added += 1
        assert added == extra_per_image
        num_extra[d["image_id"]] = added
    proposals = detections_to_proposals(detections, image_ids=[d["image_id"] for d in dicts])
    save_proposals(proposals, str(path))
    return num_extra


def test_proposals_oracle_gives_ap_100_and_box_scores(tmp_path, subset, monkeypatch):
    path = tmp_path / "proposals" / "subset.pkl"
    num_extra = _write_proposals(subset, path)
    cfg = _make_cfg(
        tmp_path,
        "MODEL.REGIONSPOT.MASK.ENABLED", False,
        "MODEL.LOAD_PROPOSALS", True,
        "MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS",
        "DATASETS.PROPOSAL_FILES_TEST", (str(path),),
    )
    model = _build(cfg)
    stats = _install_oracle(monkeypatch, model)
    res = Trainer.test(cfg, model)[SUBSET]
    assert stats["calls"] == NUM_IMAGES
    assert res["bbox"]["AP"] == pytest.approx(100.0, abs=1e-3)

    # Output scores are box score x class probability: 0.9 for GT boxes, 0.1 for the extra ones.
    batch = _first_input(cfg)
    x = batch[0]
    assert len(x["proposals"]) == len(x["instances"]) + num_extra[x["image_id"]]
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    n_props = len(x["proposals"])
    assert len(out) == min(cfg.MODEL.REGIONSPOT.SCORE.TOPK, n_props * NUM_CLASSES, cfg.TEST.DETECTIONS_PER_IMAGE)
    best = out[: n_props]  # each proposal's oracle class comes first (prob ~1 vs ~e-44)
    iou = pairwise_iou(best.pred_boxes, x["instances"].gt_boxes).max(dim=1).values
    is_gt = iou > 0.99
    assert int(is_gt.sum()) == len(x["instances"])
    assert torch.allclose(best.scores[is_gt], torch.full((int(is_gt.sum()),), 0.9), atol=1e-5)
    assert torch.allclose(best.scores[~is_gt], torch.full((int((~is_gt).sum()),), 0.1), atol=1e-5)
    # GT boxes carry their GT class.
    match = pairwise_iou(best.pred_boxes[is_gt], x["instances"].gt_boxes).argmax(dim=1)
    assert torch.equal(best.pred_classes[is_gt], x["instances"].gt_classes[match])
    # The remaining pairs have (near) zero scores.
    assert torch.all(out.scores[n_props:] < 1e-6)


def test_proposals_without_box_scores(tmp_path, subset, monkeypatch):
    path = tmp_path / "proposals.pkl"
    _write_proposals(subset, path)
    cfg = _make_cfg(
        tmp_path,
        "MODEL.REGIONSPOT.MASK.ENABLED", False,
        "MODEL.LOAD_PROPOSALS", True,
        "MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS",
        "MODEL.REGIONSPOT.SCORE.USE_BOX_SCORES", False,
        "DATASETS.PROPOSAL_FILES_TEST", (str(path),),
    )
    model = _build(cfg)
    _install_oracle(monkeypatch, model)
    batch = _first_input(cfg)
    n_props = len(batch[0]["proposals"])
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    assert torch.allclose(out.scores[:n_props], torch.ones(n_props), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 5. LVIS evaluator
def _write_lvis_json(dicts, path):
    """
    An LVIS-format json of the subset. Image ids are shifted by one (LVIS ids are >= 1) and
    ``coco_url`` ends with ``<split>/<file>`` as detectron2's loader expects (it joins
    ``image_root + split`` and the file name). Frequencies are spread so that each of r/c/f holds
    a class present in the subset.
    """
    present = sorted({a["category_id"] for d in dicts for a in d["annotations"]})
    assert len(present) >= 3, present
    absent = [c for c in range(NUM_CLASSES) if c not in present]
    frequency = {}
    for i, c in enumerate(present + absent):
        frequency[c] = "rcf"[i % 3]
    images, annotations = [], []
    for d in dicts:
        split, name = d["file_name"].split(os.sep)[-2:]
        image_id = d["image_id"] + 1
        cats = sorted({a["category_id"] + 1 for a in d["annotations"]})
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "coco_url": f"http://images.example.org/{split}/{name}",
                "height": d["height"],
                "width": d["width"],
                "not_exhaustive_category_ids": [],
                # every class absent from the image is verified absent
                "neg_category_ids": [c for c in range(1, NUM_CLASSES + 1) if c not in cats],
            }
        )
        for a in d["annotations"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": a["category_id"] + 1,
                    "bbox": list(BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYWH_ABS)),
                    "area": a["area"],
                    "segmentation": a["segmentation"],
                }
            )
    categories = []
    for c, name in enumerate(SHAPES_CLASSES):
        categories.append(
            {
                "id": c + 1,
                "name": name.replace(" ", "_"),
                "synset": name.replace(" ", "_") + ".n.01",
                "frequency": frequency[c],
                "image_count": sum(any(a["category_id"] == c for a in d["annotations"]) for d in dicts),
                "instance_count": sum(a["category_id"] == c for d in dicts for a in d["annotations"]),
            }
        )
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    image_root = os.path.dirname(os.path.dirname(dicts[0]["file_name"])) + os.sep
    return image_root, frequency


@pytest.fixture
def lvis_subset(tmp_path, subset):
    json_file = str(tmp_path / "lvis_shapes.json")
    image_root, frequency = _write_lvis_json(subset, json_file)
    register_lvis_instances(LVIS_SUBSET, {"thing_classes": list(SHAPES_CLASSES)}, json_file, image_root)
    # register_lvis_instances loads with load_lvis_json(..., dataset_name=name), which replaces
    # the metadata's thing_classes by detectron2's built-in LVIS ones picked from the *name*
    # (and raises for a name without "v0.5"/"v1"/"cocofied"); a json of custom categories must be
    # loaded without dataset_name, its category ids 1..C becoming 0..C-1.
    DatasetCatalog.remove(LVIS_SUBSET)
    DatasetCatalog.register(LVIS_SUBSET, lambda: load_lvis_json(json_file, image_root))
    yield frequency
    DatasetCatalog.remove(LVIS_SUBSET)
    MetadataCatalog.remove(LVIS_SUBSET)


def test_lvis_oracle_gives_ap_100(tmp_path, subset, lvis_subset, monkeypatch):
    frequency = lvis_subset
    dicts = DatasetCatalog.get(LVIS_SUBSET)
    assert [os.path.realpath(d["file_name"]) for d in dicts] == [os.path.realpath(d["file_name"]) for d in subset]

    cfg = _make_cfg(tmp_path, "DATASETS.TEST", (LVIS_SUBSET,), "MODEL.REGIONSPOT.MASK.ENABLED", False)
    model = _build(cfg)
    assert model.roi_heads.class_names == list(SHAPES_CLASSES)
    assert isinstance(Trainer.build_evaluator(cfg, LVIS_SUBSET), LVISEvaluator)
    stats = _install_oracle(monkeypatch, model)
    res = Trainer.test(cfg, model)[LVIS_SUBSET]
    assert stats["calls"] == NUM_IMAGES
    assert set(res) == {"bbox"}
    bbox = res["bbox"]
    assert {"AP", "AP50", "APr", "APc", "APf"} <= set(bbox)
    assert bbox["AP"] == pytest.approx(100.0, abs=1e-3)
    # Each frequency group holds a class present in the subset (see _write_lvis_json).
    for key in ("APr", "APc", "APf"):
        assert bbox[key] == pytest.approx(100.0, abs=1e-3), (key, bbox, frequency)


def test_lvis_fixed_ap_selected_from_config(tmp_path, subset, lvis_subset, monkeypatch):
    """MODEL.REGIONSPOT.EVAL.AP_KIND fixed: LVIS fixed AP through the same evaluation loop."""
    from regionspot.evaluation import LVISFixedAPEvaluator

    cfg = _make_cfg(
        tmp_path, "DATASETS.TEST", (LVIS_SUBSET,), "MODEL.REGIONSPOT.MASK.ENABLED", False,
        "MODEL.REGIONSPOT.EVAL.AP_KIND", "fixed", "MODEL.REGIONSPOT.EVAL.FIXED_AP_TOPK_PER_CLASS", 50,
    )
    evaluator = Trainer.build_evaluator(cfg, LVIS_SUBSET)
    assert isinstance(evaluator, LVISFixedAPEvaluator) and evaluator.topk_per_class == 50
    model = _build(cfg)
    _install_oracle(monkeypatch, model)
    res = Trainer.test(cfg, model)[LVIS_SUBSET]
    assert set(res) == {"bbox-fixed"}
    for key in ("AP", "APr", "APc", "APf"):
        assert res["bbox-fixed"][key] == pytest.approx(100.0, abs=1e-3), (key, res)
    card = json.loads((tmp_path / "protocol_card.json").read_text())[0]
    assert card["ap"]["kind"].startswith("fixed") and card["ap"]["topk_per_class"] == 50
    # Fixed AP is an LVIS metric: asking it of a COCO-style dataset is refused up front.
    coco_cfg = _make_cfg(tmp_path, "MODEL.REGIONSPOT.EVAL.AP_KIND", "fixed")
    with pytest.raises(ValueError, match="AP_KIND 'standard'"):
        Trainer.build_evaluator(coco_cfg, SUBSET)


def test_lvis_anti_oracle_gives_ap_0(tmp_path, subset, lvis_subset, monkeypatch):
    cfg = _make_cfg(
        tmp_path, "DATASETS.TEST", (LVIS_SUBSET,), "MODEL.REGIONSPOT.MASK.ENABLED", False,
        "MODEL.REGIONSPOT.SCORE.MODE", "per_region",
    )
    model = _build(cfg)
    _install_oracle(monkeypatch, model, shift=1)
    res = Trainer.test(cfg, model)[LVIS_SUBSET]
    assert res["bbox"]["AP"] == pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# 6. train_net.py --eval-only
def test_train_net_eval_only(tmp_path):
    env = dict(os.environ)
    env["DETECTRON2_DATASETS"] = str(tmp_path / "datasets")
    env["REGIONSPOT_CACHE"] = str(tmp_path / "cache")
    env.setdefault("OMP_NUM_THREADS", "1")  # see _one_thread
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, os.path.join(REPO_ROOT, "train_net.py"),
            "--config-file", TINY_CONFIG,
            "--eval-only",
            "OUTPUT_DIR", str(out),
            "DATASETS.TEST", '("regionspot_shapes_val",)',
            "MODEL.REGIONSPOT.MASK.ENABLED", "False",
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net; ~6 s on an idle machine
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "copypaste: Task: bbox" in log
    assert "copypaste: Task: bbox" in (out / "log.txt").read_text()
    # The dataset was generated under DETECTRON2_DATASETS.
    assert (tmp_path / "datasets" / "regionspot_shapes" / "val" / "annotations.json").is_file()
    # One protocol card per evaluated dataset, beside metrics.json and in the dataset's folder.
    cards = json.loads((out / "protocol_card.json").read_text())
    assert len(cards) == 1
    card = cards[0]
    assert card == json.loads((out / "inference" / "regionspot_shapes_val" / "protocol_card.json").read_text())
    assert card["dataset"]["name"] == "regionspot_shapes_val"
    assert card["box_source"] == {"kind": "GT"}
    assert card["ap"]["kind"] == "standard coco"
    assert card["image_scale"]["name"] == "single-resize" and card["image_scale"]["min_size_test"] == 0
    assert card["vocabulary"]["size"] == NUM_CLASSES
    assert card["scoring"]["pairs_per_image"] == 100 and card["scoring"]["detections_per_image"] == 100
    assert card["weights"]["sam"] == {"type": "tiny", "weights": None, "random_init_seed": 0}
    assert card["weights"]["checkpoint"] is None
    assert card["results"]["bbox"]["AP"] == pytest.approx(_copypaste_ap(log), abs=1e-4)  # printed with 4 decimals
    assert "Protocol card of regionspot_shapes_val" in log


def _copypaste_ap(log: str) -> float:
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "copypaste: Task: bbox" in line:
            return float(lines[i + 2].split("copypaste: ")[1].split(",")[0])
    raise AssertionError("no copypaste block in the log")


def test_protocol_card_of_the_authors_protocol_with_proposals(tmp_path, subset):
    from regionspot.evaluation import build_protocol_card

    props = tmp_path / "props.pkl"
    props.write_bytes(b"x")
    cfg = _make_cfg(
        tmp_path, "INPUT.MIN_SIZE_TEST", 800, "MODEL.LOAD_PROPOSALS", True, "MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS",
        "DATASETS.PROPOSAL_FILES_TEST", (str(props),), "MODEL.REGIONSPOT.EVAL.AP_KIND", "fixed",
    )
    card = build_protocol_card(cfg, SUBSET)
    assert card["image_scale"]["name"] == "authors"
    assert card["image_scale"]["box_rescale"] == "authors" and card["image_scale"]["mask_resize"] == "authors"
    assert card["box_source"]["kind"] == "proposal file"
    assert card["box_source"]["files"][0]["sha256"] == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert card["ap"]["kind"].startswith("fixed") and card["ap"]["topk_per_class"] == 10000
    assert "warnings" not in card
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.VOCAB.SOURCE = "custom"
    cfg.MODEL.REGIONSPOT.VOCAB.CUSTOM = ["circle"]
    assert "every score is 1.0" in build_protocol_card(cfg, SUBSET)["warnings"][0]
    cfg.MODEL.REGIONSPOT.VOCAB.SOURCE = "dataset"
    cfg.MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE = "fixed"
    cfg.MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE = "fixed"
    assert build_protocol_card(cfg, SUBSET)["image_scale"]["name"] == "authors-resize-fixed"
