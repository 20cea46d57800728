"""
Guarded inputs of a run (one of the tests/test_guard_*.py files, see docs/INPUT_CHECKS.md): your own
COCO-format dataset registered the detectron2 way, fail-fast checks of paths, datasets and proposal
files before the model is built, detectron2's DefaultPredictor, and a CUDA device on a machine without.
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import convert_to_coco_json, register_coco_instances
from detectron2.engine import DefaultPredictor

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg
from regionspot.data import detections_to_proposals, save_proposals
from regionspot.data.checks import check_proposal_file, check_run_inputs
from regionspot.data.shapes import SHAPES_CLASSES, SHAPES_SPLITS, generate_shapes_split
from regionspot.data.user_datasets import register_coco_datasets
from regionspot.modeling.zero_shot_classifier import vocabulary_from_config

NUM_IMAGES = 4


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """A small COCO-format dataset on disk (generated shapes images and their json)."""
    root = tmp_path_factory.mktemp("own_coco")
    _, seed = SHAPES_SPLITS["val"]
    dicts = generate_shapes_split(str(root / "images"), "val", NUM_IMAGES, seed)
    name = "rs_guard_shapes_dicts"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
    json_file = str(root / "val.json")
    convert_to_coco_json(name, json_file, allow_cached=False)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    return json_file, str(root / "images"), dicts


def _register(name, coco_files):
    json_file, image_root, _ = coco_files
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_file, image_root)
    return name


def test_register_coco_instances_gives_the_vocabulary(coco_files):
    """detectron2 fills thing_classes only on loading; the vocabulary is read from the json."""
    name = _register("rs_guard_own_val", coco_files)
    assert MetadataCatalog.get(name).get("thing_classes", None) is None
    cfg = tiny_cfg("DATASETS.TEST", (name,))
    assert vocabulary_from_config(cfg) == list(SHAPES_CLASSES)
    # Loading later sets the same list (detectron2 refuses a different one).
    DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == list(SHAPES_CLASSES)


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", TINY_CONFIG,
                           *args], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)


def test_train_and_evaluate_own_coco_dataset_with_train_net(coco_files, tmp_path):
    json_file, image_root, _ = coco_files
    spec = ["--coco-dataset", "own_train", json_file, image_root, "--coco-dataset", "own_val", json_file, image_root]
    run = _run(spec + ["OUTPUT_DIR", str(tmp_path / "train"), "DATASETS.TRAIN", "('own_train',)",
                       "DATASETS.TEST", "('own_val',)", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
                       "MODEL.REGIONSPOT.MASK.ENABLED", "False"], tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "copypaste: Task: bbox" in log
    card = json.loads((tmp_path / "train" / "protocol_card.json").read_text())[0]
    assert card["dataset"]["name"] == "own_val" and card["vocabulary"]["size"] == len(SHAPES_CLASSES)
    assert (tmp_path / "train" / "model_final.pth").is_file()


def test_missing_weights_fail_before_the_model_is_built(tmp_path):
    run = _run(["--eval-only", "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.WEIGHTS", str(tmp_path / "nope.pth")], tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert "MODEL.WEIGHTS=" in log and "nope.pth" in log and "does not exist" in log
    assert "Encoding" not in log  # the vocabulary was never encoded


@pytest.mark.parametrize("key", ["MODEL.REGIONSPOT.SAM.WEIGHTS", "MODEL.REGIONSPOT.CLIP.WEIGHTS",
                                 "MODEL.REGIONSPOT.HEAD.WEIGHTS", "MODEL.REGIONSPOT.DETECTOR.WEIGHTS"])
def test_missing_weight_paths_are_named(key, tmp_path):
    cfg = tiny_cfg(key, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=key.replace(".", r"\.") + ".*missing.pth.*does not exist"):
        check_run_inputs(cfg, eval_only=True)


def test_unregistered_dataset_and_missing_json(coco_files, tmp_path):
    with pytest.raises(ValueError, match="DATASETS.TEST names dataset 'no_such_set', which is not registered"):
        check_run_inputs(tiny_cfg("DATASETS.TEST", ("no_such_set",)), eval_only=True)
    name = "rs_guard_gone_json"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(tmp_path / "gone.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gone.json.*rs_guard_gone_json.*does not exist"):
        check_run_inputs(tiny_cfg("DATASETS.TEST", (name,)), eval_only=True)
    with pytest.raises(FileNotFoundError, match="--coco-dataset x: annotation file"):
        register_coco_datasets([("x", str(tmp_path / "gone.json"), str(tmp_path))])


def _proposals(tmp_path, dicts, name="p.pkl", image_ids=None, dataset=None, shift=0.0):
    dets = [{"image_id": d["image_id"], "bbox": [5.0 + shift, 5.0, 20.0, 20.0], "score": 0.9} for d in dicts]
    image_ids = image_ids if image_ids is not None else [d["image_id"] for d in dicts]
    props = detections_to_proposals([x for x in dets if x["image_id"] in image_ids], image_ids=image_ids)
    if dataset:
        props["dataset"] = dataset
    path = str(tmp_path / name)
    save_proposals(props, path)
    return path


def test_proposal_file_checked_against_its_dataset(coco_files, tmp_path):
    name = _register("rs_guard_props_val", coco_files)
    dicts = DatasetCatalog.get(name)
    check_proposal_file(_proposals(tmp_path, dicts), name)  # a good file passes
    with pytest.raises(ValueError, match=r"no entry for 2 of the 4 images .*--dataset rs_guard_props_val"):
        check_proposal_file(_proposals(tmp_path, dicts, image_ids=[d["image_id"] for d in dicts[:2]]), name)
    with pytest.raises(ValueError, match="made for dataset 'lvis_v1_val' but is used with 'rs_guard_props_val'"):
        check_proposal_file(_proposals(tmp_path, dicts, dataset="lvis_v1_val"), name)
    # Ids that overlap but boxes of another dataset's (larger) images: refused.
    with pytest.raises(ValueError, match="4 of the 4 boxes .* lie entirely outside"):
        check_proposal_file(_proposals(tmp_path, dicts, shift=5000.0), name)
    (tmp_path / "bad.pkl").write_bytes(b"<html>not a pickle</html>")
    with pytest.raises(ValueError, match="bad.pkl' is not a readable pickle"):
        check_proposal_file(str(tmp_path / "bad.pkl"), name)
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"boxes": []}, f)
    with pytest.raises(ValueError, match="not a detectron2 proposal file"):
        check_proposal_file(str(tmp_path / "dict.pkl"), name)


def test_one_proposal_file_per_test_dataset(coco_files, tmp_path):
    a = _register("rs_guard_props_val", coco_files)
    b = _register("rs_guard_props_val2", coco_files)
    path = _proposals(tmp_path, DatasetCatalog.get(a))
    cfg = tiny_cfg("DATASETS.TEST", (a, b), "MODEL.LOAD_PROPOSALS", True, "MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS",
                   "DATASETS.PROPOSAL_FILES_TEST", (path,))
    with pytest.raises(ValueError, match="1 file\\(s\\) for the 2 test datasets"):
        check_run_inputs(cfg, eval_only=True)


def test_default_predictor_names_the_ways_to_give_regions(photo):
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 256)
    with pytest.raises(ValueError, match="Ways to give regions.*detected_instances.*SamAutomaticProposals"):
        DefaultPredictor(cfg)(photo)


def test_default_predictor_works_with_sam_automatic_proposals(photo):
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 256, "MODEL.REGIONSPOT.BOX_SOURCE", "GENERATOR",
                   "MODEL.PROPOSAL_GENERATOR.NAME", "SamAutomaticProposals",
                   "MODEL.REGIONSPOT.AMG.POINTS_PER_SIDE", 4, "MODEL.REGIONSPOT.AMG.PRED_IOU_THRESH", 0.0,
                   "MODEL.REGIONSPOT.AMG.STABILITY_SCORE_THRESH", 0.0)
    torch.manual_seed(0)
    out = DefaultPredictor(cfg)(np.ascontiguousarray(photo[:, :, ::-1]))  # DefaultPredictor takes BGR
    inst = out["instances"]
    assert inst.image_size == photo.shape[:2]
    assert len(inst) > 0 and inst.has("pred_classes") and inst.has("scores")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match="MODEL.DEVICE='cuda' but this machine has no usable CUDA device.*MODEL.DEVICE cpu"):
        build_model(tiny_cfg("MODEL.DEVICE", "cuda"))
