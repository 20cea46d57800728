"""
ODinW-13: registration in the layout of GLIP's release, vocabularies from each json, and
``tools/evaluate_odinw.py`` end to end on small generated stand-ins (CPU, tiny random-weight models).

Four of the 13 datasets are generated under a temp root, each in its real layout: AerialMaritimeDrone
(``large/valid/``, five classes), pistols (one ``export/`` folder, json named after the split),
EgoHands (the ``mini_val/`` split GLIP evaluates, one image without annotations) and Raccoon as a raw
Roboflow export that still has the background placeholder category (id 0), which must be refused.
The other nine are missing.
"""
import json
import os
import re
import subprocess
import sys
from collections import deque

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg
from regionspot.data import detections_to_proposals, save_proposals
from regionspot.data.odinw import (
    ODINW13_BENCHMARK_SPLIT,
    ODINW13_DATASETS,
    available_odinw_datasets,
    missing_odinw_datasets,
    odinw_dataset_name,
    odinw_paths,
    register_odinw,
    resolve_odinw_names,
)
from regionspot.evaluation.evaluator import evaluate_datasets

TOOL = os.path.join(REPO_ROOT, "tools", "evaluate_odinw.py")
PREFIX = "rs_test_odinw"

# short name -> categories of the generated json, boxes per image ([] = an image without boxes).
STANDINS = {
    "AerialMaritimeDrone": {
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "movable-objects"}
            for i, n in enumerate(["boat", "car", "dock", "jetski", "lift"])
        ],
        "boxes": [[(4, 6, 30, 20, 1), (40, 30, 30, 24, 3)], [(10, 10, 40, 30, 5), (56, 8, 20, 16, 2)]],
    },
    "pistols": {
        "categories": [{"id": 1, "name": "pistol", "supercategory": "Guns"}],
        "boxes": [[(8, 8, 36, 22, 1)], [(20, 14, 40, 30, 1), (4, 40, 22, 14, 1)]],
    },
    "EgoHands": {
        "categories": [{"id": 1, "name": "hand", "supercategory": "hands"}],
        "boxes": [[(6, 6, 28, 28, 1), (44, 20, 30, 30, 1)], [], [(12, 30, 40, 24, 1)]],
    },
}
# A raw Roboflow export: the dataset-level placeholder category id 0 is still there.
RAW_EXPORT = {
    "categories": [{"id": 0, "name": "raccoons", "supercategory": "none"},
                   {"id": 1, "name": "raccoon", "supercategory": "raccoons"}],
    "boxes": [[(10, 10, 30, 30, 1)]],
}
EXPECTED_CLASSES = {
    "AerialMaritimeDrone": ["boat", "car", "dock", "jetski", "lift"],
    "pistols": ["pistol"],
    "EgoHands": ["hand"],
}


def _write_standin(root, short, spec, seed):
    """One dataset in its real layout: JPEG images and a Roboflow-style COCO json."""
    image_root, json_file = odinw_paths(short, "benchmark", str(root))
    os.makedirs(image_root, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i, boxes in enumerate(spec["boxes"]):
        h, w = 60, 80
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for x, y, bw, bh, c in boxes:
            img[y : y + bh, x : x + bw] = (40 * c) % 256, 200, 255 - 30 * c
        file_name = f"{short.lower()}_{i}.jpg"
        assert cv2.imwrite(os.path.join(image_root, file_name), img)
        images.append({"id": i, "file_name": file_name, "height": h, "width": w})
        for x, y, bw, bh, c in boxes:
            # Ids from 1: COCO evaluation never counts a ground truth with id 0 as found (Roboflow's
            # ids start at 0; see regionspot/data/odinw.py), and the oracle below expects AP 100.
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": c, "bbox": [x, y, bw, bh],
                "area": bw * bh, "iscrowd": 0, "segmentation": [],
            })
    # Roboflow's key order: categories before images and annotations.
    data = {"info": {"description": short}, "licenses": [], "categories": spec["categories"],
            "images": images, "annotations": annotations}
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file


@pytest.fixture(scope="module")
def odinw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("odinw_root")
    for seed, (short, spec) in enumerate(STANDINS.items()):
        _write_standin(root, short, spec, seed)
    _write_standin(root, "Raccoon", RAW_EXPORT, 9)
    return str(root)


@pytest.fixture(scope="module")
def registered(odinw_root):
    names = register_odinw(root=odinw_root, prefix=PREFIX)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _tool_env(root):
    env = dict(os.environ, DETECTRON2_DATASETS=root, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    return env


def _run_tool(root, *args, timeout=240):
    return subprocess.run(
        [sys.executable, TOOL, *args], cwd=REPO_ROOT, env=_tool_env(root), capture_output=True, text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------------------
# Layout and registration
def test_layout_is_glips():
    assert list(ODINW13_DATASETS) == [
        "AerialMaritimeDrone", "Aquarium", "CottontailRabbits", "EgoHands", "NorthAmericaMushrooms", "Packages",
        "PascalVOC", "pistols", "pothole", "Raccoon", "ShellfishOpenImages", "thermalDogsAndPeople",
        "VehiclesOpenImages",
    ]
    # GLIP's DATASETS.TEST: "val" everywhere but EgoHands / VehiclesOpenImages ("minival").
    assert {s for s, split in ODINW13_BENCHMARK_SPLIT.items() if split == "minival"} == {"EgoHands", "VehiclesOpenImages"}
    assert ODINW13_DATASETS["AerialMaritimeDrone"] == (
        "odinw/AerialMaritimeDrone/large/valid", "odinw/AerialMaritimeDrone/large/valid/annotations_without_background.json"
    )
    assert ODINW13_DATASETS["Aquarium"][1] == (
        "odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco/valid/annotations_without_background.json"
    )
    assert ODINW13_DATASETS["EgoHands"][1] == "odinw/EgoHands/generic/mini_val/annotations_without_background.json"
    assert ODINW13_DATASETS["pistols"] == ("odinw/pistols/export", "odinw/pistols/export/val_annotations_without_background.json")
    assert ODINW13_DATASETS["VehiclesOpenImages"][0] == "odinw/VehiclesOpenImages/416x416/mini_val"
    for short, (image_root, json_file) in ODINW13_DATASETS.items():
        assert image_root.startswith("odinw/") and os.path.dirname(json_file) == image_root
    assert odinw_dataset_name("EgoHands") == "odinw13_EgoHands_minival"
    assert odinw_dataset_name("EgoHands", "test") == "odinw13_EgoHands_test"
    assert odinw_paths("pistols", "test", "/data")[1] == "/data/odinw/pistols/export/test_annotations_without_background.json"
    assert resolve_odinw_names(["PISTOLS", "egohands", "pistols"]) == ["pistols", "EgoHands"]
    with pytest.raises(ValueError, match="the 13 are"):
        resolve_odinw_names(["Pascal"])
    with pytest.raises(ValueError, match="no 'minival' split"):
        odinw_paths("Aquarium", "minival")


def test_registration_names_paths_and_vocabulary(odinw_root, registered):
    # val + test of every dataset, and minival of two.
    assert len(registered) == 13 * 2 + 2 and len(set(registered)) == len(registered)
    for short in ODINW13_DATASETS:
        name = odinw_dataset_name(short, prefix=PREFIX)
        assert name in registered
        meta = MetadataCatalog.get(name)
        image_root, json_file = odinw_paths(short, root=odinw_root)
        assert (meta.json_file, meta.image_root, meta.evaluator_type) == (json_file, image_root, "coco")
        assert meta.odinw_dataset == short and meta.odinw_split == ODINW13_BENCHMARK_SPLIT[short]
        if short in STANDINS:
            # The vocabulary is the json's categories, in id order.
            assert meta.thing_classes == EXPECTED_CLASSES[short]
            ids = [c["id"] for c in STANDINS[short]["categories"]]
            assert meta.thing_dataset_id_to_contiguous_id == {i: k for k, i in enumerate(ids)}
        else:
            # No json, or the raw export (refused): no classes.
            assert meta.get("thing_classes", None) is None

    # Loading agrees with the metadata; category ids are contiguous; images are where the dicts say.
    for short, spec in STANDINS.items():
        name = odinw_dataset_name(short, prefix=PREFIX)
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == len(spec["boxes"])
        assert MetadataCatalog.get(name).thing_classes == EXPECTED_CLASSES[short]
        for d, boxes in zip(dicts, spec["boxes"]):
            assert os.path.isfile(d["file_name"])
            assert [a["category_id"] for a in d["annotations"]] == [
                MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id[c] for *_, c in boxes
            ]
    drone = DatasetCatalog.get(odinw_dataset_name("AerialMaritimeDrone", prefix=PREFIX))
    assert drone[0]["annotations"][1]["category_id"] == 2  # json id 3 ("dock") -> class 2
    assert all("id" not in a for d in drone for a in d["annotations"])

    # The raw export's placeholder would become a class ("raccoons"): loading it is refused.
    with pytest.raises(ValueError, match="background placeholder"):
        DatasetCatalog.get(odinw_dataset_name("Raccoon", prefix=PREFIX))


def test_missing_datasets_are_reported_one_line_each(odinw_root):
    assert available_odinw_datasets(odinw_root) == ["AerialMaritimeDrone", "EgoHands", "pistols"]
    missing = missing_odinw_datasets(odinw_root)
    assert list(missing) == [s for s in ODINW13_DATASETS if s not in STANDINS]
    for short, why in missing.items():
        assert "\n" not in why and odinw_paths(short, root=odinw_root)[1] in why
        if short == "Raccoon":
            assert "background placeholder" in why and "annotations_without_background.json" in why
        else:
            assert why.startswith("annotation file not found: ")
    # The test split of the stand-ins was not generated.
    assert available_odinw_datasets(odinw_root, split="test") == []
    assert available_odinw_datasets(odinw_root, names=["pistols", "Raccoon"]) == ["pistols"]


def test_registration_is_idempotent_and_follows_the_root(odinw_root, tmp_path):
    prefix = "rs_test_odinw_idem"
    empty = str(tmp_path / "empty")
    try:
        first = register_odinw(root=empty, prefix=prefix)
        assert register_odinw(root=empty, prefix=prefix) == first
        name = odinw_dataset_name("pistols", prefix=prefix)
        assert MetadataCatalog.get(name).get("thing_classes", None) is None
        # The data arrives: the same call fills the vocabulary in.
        _write_standin(empty, "pistols", STANDINS["pistols"], 0)
        register_odinw(root=empty, prefix=prefix)
        assert MetadataCatalog.get(name).thing_classes == ["pistol"]
        # Another root: the names now point there.
        assert register_odinw(root=odinw_root, prefix=prefix) == first
        assert MetadataCatalog.get(name).json_file == odinw_paths("pistols", root=odinw_root)[1]
        assert len(DatasetCatalog.get(name)) == len(STANDINS["pistols"]["boxes"])
    finally:
        for n in [n for n in DatasetCatalog.list() if n.startswith(prefix + "_")]:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


# ------------------------------------------------------------------------------------------------
# A known AP: with the class of the best-overlapping GT box as the prediction, every dataset must
# score AP 100, which holds only if json category ids -> classes -> json ids round-trip and the
# image without boxes is handled.
def _install_oracle(monkeypatch, model):
    pending = deque()
    original_regions = model._regions

    def regions(batched_inputs, images=None):
        out = original_regions(batched_inputs, images)
        for x, r in zip(batched_inputs, out):
            gt = x["instances"]
            pending.append((gt.gt_boxes.to("cpu"), gt.gt_classes.to("cpu"), r.proposal_boxes.to("cpu")))
        return out

    def logits(region_embeddings, vocabulary=None):
        gt_boxes, gt_classes, region_boxes = pending.popleft()
        c = model.roi_heads.num_classes
        if len(region_boxes) == 0:
            return region_embeddings.new_zeros(0, c)
        best = pairwise_iou(region_boxes, gt_boxes).argmax(dim=1)
        return 100.0 * torch.nn.functional.one_hot(gt_classes[best], c).to(region_embeddings)

    monkeypatch.setattr(model, "_regions", regions)
    monkeypatch.setattr(model.roi_heads.classifier, "forward", logits)


def test_oracle_gives_ap_100_on_each_dataset(registered, tmp_path, monkeypatch):
    names = [odinw_dataset_name(short, prefix=PREFIX) for short in STANDINS]
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", (), "DATASETS.TEST", tuple(names),
                   "MODEL.REGIONSPOT.MASK.ENABLED", False)
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _install_oracle(monkeypatch, model)
    evaluators = [COCOEvaluator(n, tasks=("bbox",), output_dir=str(tmp_path / n)) for n in names]
    results = evaluate_datasets(cfg, model, evaluators=evaluators, dataset_names=names)
    assert list(results) == names
    for name in names:
        assert results[name]["bbox"]["AP"] == pytest.approx(100.0, abs=1e-3), name


# ------------------------------------------------------------------------------------------------
# tools/evaluate_odinw.py
_ROW = re.compile(r"^(\S+)\s+(val|minival|test)\s+(\d+)\s+(\S+)\s+(\S+)$")


def _table(stdout):
    rows = {}
    average = None
    for line in stdout.splitlines():
        m = _ROW.match(line.strip())
        if m and m.group(1) in ODINW13_DATASETS:
            rows[m.group(1)] = m.group(4)
        if line.startswith("average ("):
            average = line.split()[-1]
    return rows, average


def test_tool_prints_ap_per_dataset_and_the_average(odinw_root, tmp_path):
    out = tmp_path / "out"
    proc = _run_tool(odinw_root, "--config-file", TINY_CONFIG, "--", "OUTPUT_DIR", str(out), "MODEL.REGIONSPOT.MASK.ENABLED", "False")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("Skipping ODinW dataset")]
    assert len(skips) == 10  # nine missing, and the raw export
    for short in ODINW13_DATASETS:
        hits = [line for line in skips if line.startswith(f"Skipping ODinW dataset {short}:")]
        assert len(hits) == (0 if short in STANDINS else 1), short
        if hits:
            assert odinw_paths(short, root=odinw_root)[1] in hits[0]
    assert "Box source: GT" in proc.stdout

    summary = json.loads((out / "odinw13_summary.json").read_text())
    rows, average = _table(proc.stdout)
    assert sorted(rows) == sorted(STANDINS) == sorted(r["dataset"] for r in summary["datasets"])
    aps = [r["AP"] for r in summary["datasets"]]
    assert all(0.0 <= ap <= 100.0 for ap in aps)
    assert summary["average_AP"] == pytest.approx(sum(aps) / len(aps), abs=1e-9)
    assert summary["num_averaged"] == 3 and summary["split"] == "benchmark"
    assert summary["box_source"].startswith("GT")
    assert average == f"{summary['average_AP']:.2f}"
    for r in summary["datasets"]:
        assert rows[r["dataset"]] == f"{r['AP']:.2f}"
        assert r["name"] == odinw_dataset_name(r["dataset"])
        assert r["num_classes"] == len(EXPECTED_CLASSES[r["dataset"]])
    assert sorted(s["dataset"] for s in summary["skipped"]) == sorted(set(ODINW13_DATASETS) - set(STANDINS))


def test_tool_with_proposal_files(odinw_root, tmp_path):
    # Proposals = the GT boxes with a score, for two datasets; the third has no file and is skipped.
    proposals_dir = tmp_path / "proposals"
    for short in ("AerialMaritimeDrone", "EgoHands"):
        _, json_file = odinw_paths(short, root=odinw_root)
        data = json.load(open(json_file))
        detections = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 0.9} for a in data["annotations"]]
        props = detections_to_proposals(detections, image_ids=[im["id"] for im in data["images"]])
        save_proposals(props, str(proposals_dir / f"{odinw_dataset_name(short)}.pkl"))
    out = tmp_path / "out"
    proc = _run_tool(
        odinw_root, "--config-file", TINY_CONFIG, "--proposals-dir", str(proposals_dir),
        "OUTPUT_DIR", str(out), "MODEL.REGIONSPOT.MASK.ENABLED", "False",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    expected_file = proposals_dir / f"{odinw_dataset_name('pistols')}.pkl"
    assert f"Skipping ODinW dataset pistols: proposal file not found: {expected_file}" in proc.stdout
    assert f"Box source: proposal files {proposals_dir}/<dataset name>.pkl" in proc.stdout
    summary = json.loads((out / "odinw13_summary.json").read_text())
    assert [r["dataset"] for r in summary["datasets"]] == ["AerialMaritimeDrone", "EgoHands"]
    assert summary["box_source"].startswith("proposal files")
    rows, average = _table(proc.stdout)
    assert sorted(rows) == ["AerialMaritimeDrone", "EgoHands"] and average == f"{summary['average_AP']:.2f}"


def test_tool_without_datasets_fails_clearly(tmp_path):
    root = tmp_path / "nothing"
    proc = _run_tool(str(root), "--config-file", TINY_CONFIG, "OUTPUT_DIR", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("Skipping ODinW dataset")]) == 13
    assert f"No ODinW-13 dataset to evaluate under {root / 'odinw'}" in proc.stderr
    assert not (tmp_path / "out" / "odinw13_summary.json").exists()
