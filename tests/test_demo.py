"""demo/demo.py and tools/dump_text_embeddings.py end to end (subprocesses, CPU, tiny random models)."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from regionspot.data.vocabularies import OBJECTS365_CLASSES, get_vocabulary
from regionspot.modeling.text_embeddings import PROMPT_TEMPLATES

from conftest import REPO_ROOT

DEMO = os.path.join(REPO_ROOT, "demo", "demo.py")
DUMP = os.path.join(REPO_ROOT, "tools", "dump_text_embeddings.py")
VOCAB = ["person", "flag", "cup"]
ASTRONAUT_BOXES = [[40.0, 20.0, 330.0, 500.0], [350.0, 10.0, 510.0, 300.0, 0.8], [180.0, 60.0, 300.0, 200.0]]


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("regionspot_demo_script", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with two real photos (PNG, lossless) and a boxes JSON that covers only the first."""
    from skimage import data

    folder = tmp_path_factory.mktemp("demo_images")
    astronaut, coffee = data.astronaut(), data.coffee()
    cv2.imwrite(str(folder / "astronaut.png"), astronaut[:, :, ::-1])
    cv2.imwrite(str(folder / "coffee.png"), coffee[:, :, ::-1])
    boxes = folder.parent / f"{folder.name}_boxes.json"
    boxes.write_text(json.dumps({"astronaut.png": ASTRONAUT_BOXES}))
    return {"folder": folder, "boxes": boxes, "astronaut": astronaut, "coffee": coffee}


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(
        REGIONSPOT_CACHE=str(tmp_path / "cache"),
        DETECTRON2_DATASETS=str(tmp_path / "datasets"),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return e


def _run(script, args, env):
    proc = subprocess.run(
        [sys.executable, script, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    return proc, proc.stdout + proc.stderr


def _check_entry(entry, height, width, vocabulary=VOCAB):
    assert {"image_id", "file_name", "category_id", "category_name", "bbox", "score", "segmentation"} <= set(entry)
    assert entry["category_name"] == vocabulary[entry["category_id"]]
    assert len(entry["bbox"]) == 4 and entry["bbox"][2] >= 0 and entry["bbox"][3] >= 0
    assert 0.0 <= entry["score"] <= 1.0
    rle = entry["segmentation"]
    assert rle["size"] == [height, width] and isinstance(rle["counts"], str)
    assert mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).shape == (height, width)


def test_demo_with_boxes_json(images, env, tmp_path):
    out = tmp_path / "out"
    args = [
        "--input", str(images["folder"] / "astronaut.png"), "--boxes", str(images["boxes"]),
        "--vocabulary", "custom", "--custom-vocabulary", "person, flag,cup", "--confidence-threshold", "0",
        "--output", str(out),
    ]
    proc, log = _run(DEMO, args, env)
    assert proc.returncode == 0, log
    assert "RANDOM_INIT" in log  # the random stand-in weights are announced (MODEL.REGIONSPOT.*RANDOM_INIT*)
    vis = cv2.imread(str(out / "astronaut.png"))
    assert vis is not None and vis.shape == images["astronaut"].shape
    assert not np.array_equal(vis[:, :, ::-1], images["astronaut"])  # something was drawn
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 3
    h, w = images["astronaut"].shape[:2]
    for entry in results:
        _check_entry(entry, h, w)
        assert entry["image_id"] == 0 and entry["file_name"].endswith("astronaut.png")
    expected = sorted([b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in ASTRONAUT_BOXES)
    np.testing.assert_allclose(sorted(e["bbox"] for e in results), expected, atol=1e-3)
    scores = [e["score"] for e in results]
    assert scores == sorted(scores, reverse=True)
    assert json.loads((out / "vocabulary.json").read_text()) == VOCAB
    # the embeddings were cached where REGIONSPOT_CACHE points
    assert any(f.startswith("text_") for f in os.listdir(env["REGIONSPOT_CACHE"]))


def test_demo_folder_skips_image_without_boxes(images, env, tmp_path):
    out = tmp_path / "out"
    args = [
        "--input", str(images["folder"]), "--boxes", str(images["boxes"]), "--vocabulary", "custom",
        "--custom-vocabulary", ",".join(VOCAB), "--confidence-threshold", "0", "--no-masks", "--output", str(out),
    ]
    proc, log = _run(DEMO, args, env)
    assert proc.returncode == 0, log
    assert "No boxes for 'coffee.png'" in log
    assert sorted(os.listdir(out)) == ["astronaut.png", "results.json", "vocabulary.json"]
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 3 and all("segmentation" not in e for e in results)


def test_demo_no_input_matched(env, tmp_path):
    pattern = str(tmp_path / "missing" / "*.jpg")
    boxes = tmp_path / "boxes.json"
    boxes.write_text("{}")
    proc, log = _run(DEMO, ["--input", pattern, "--boxes", str(boxes), "--output", str(tmp_path / "out")], env)
    assert proc.returncode != 0
    assert "No input images found" in log and pattern in log
    assert not (tmp_path / "out").exists()


def _readme_demo_command(marker):
    """The README's ``python demo/demo.py ...`` command that contains ``marker``, as an argument list."""
    lines = open(os.path.join(REPO_ROOT, "README.md")).read().splitlines()
    for k, line in enumerate(lines):
        if not line.startswith("python demo/demo.py"):
            continue
        command = line
        while command.endswith("\\"):
            k += 1
            command = command[:-1] + " " + lines[k].strip()
        if marker in command:
            return shlex.split(command)[2:]
    raise AssertionError(f"README.md has no demo command with {marker!r}")


def _replace_value(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_demo_readme_detector_command(images, env, tmp_path):
    """The README's detector command (model_zoo: name, tiny default config) through RegionSpotRelabel, no download."""
    out = tmp_path / "out"
    coffee = images["folder"] / "coffee.png"
    args = _readme_demo_command("--detector-config model_zoo:")
    assert "--config-file" not in args  # the tiny default preset
    args = _replace_value(_replace_value(args, "--input", str(coffee)), "--output", str(out))
    args += [
        "--confidence-threshold", "0", "--detector-weights", "",
        # Random weights: normalise the input (tames the activations) and keep every score; small and fast.
        "--detector-opts", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5",
        "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "400", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]",
    ]
    proc, log = _run(DEMO, args, env)
    assert proc.returncode == 0, log
    assert "RANDOM weights" in log and "model_zoo:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml" in log
    vocabulary = json.loads((out / "vocabulary.json").read_text())
    assert vocabulary == get_vocabulary("custom", args[args.index("--custom-vocabulary") + 1])
    results = json.loads((out / "results.json").read_text())
    assert 0 < len(results) <= 5
    h, w = images["coffee"].shape[:2]
    for entry in results:
        _check_entry(entry, h, w, vocabulary)
        x, y, bw, bh = entry["bbox"]
        assert -1e-3 <= x and -1e-3 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    assert cv2.imread(str(out / "coffee.png")).shape == images["coffee"].shape


def test_demo_sam_proposals_config(images, env, tmp_path):
    """No boxes on the command line: the config's model finds the regions (SAM automatic masks)."""
    out = tmp_path / "out"
    config = os.path.join(REPO_ROOT, "projects", "RegionSpot", "configs", "SAM-Proposals", "RegionSpot-tiny_sam-proposals_shapes.yaml")
    args = [
        "--config-file", config, "--input", str(images["folder"] / "astronaut.png"), "--vocabulary", "custom",
        "--custom-vocabulary", ",".join(VOCAB), "--confidence-threshold", "0", "--output", str(out),
    ]
    proc, log = _run(DEMO, args, env)
    assert proc.returncode == 0, log
    results = json.loads((out / "results.json").read_text())
    assert results
    h, w = images["astronaut"].shape[:2]
    for entry in results:
        _check_entry(entry, h, w)
    scores = [e["score"] for e in results]
    assert scores == sorted(scores, reverse=True)


def test_dump_text_embeddings(env, tmp_path, predictor):
    cache = env["REGIONSPOT_CACHE"]
    output = tmp_path / "emb.pt"
    args = ["--vocabulary", "custom", "--custom-vocabulary", ",".join(VOCAB), "--output", str(output)]
    proc, log = _run(DUMP, args, env)
    assert proc.returncode == 0, log
    files = [f for f in os.listdir(cache) if f.startswith("text_") and f.endswith(".pt")]
    assert len(files) == 1 and files[0] in log
    path = os.path.join(cache, files[0])
    mtime = os.path.getmtime(path)

    emb = torch.load(output)
    head = predictor.head
    assert emb.shape == (len(VOCAB), head.clip.embed_dim)
    # The tool builds CLIP as the model does: the model reads this very cache entry.
    assert files[0] == f"text_{head.classifier.text_encoder.cache.key(head.clip, VOCAB, PROMPT_TEMPLATES)}.pt"
    torch.testing.assert_close(emb, torch.load(path, weights_only=True)["embeddings"])

    proc, log = _run(DUMP, args, env)
    assert proc.returncode == 0, log
    assert "already cached" in log
    assert os.path.getmtime(path) == mtime
    assert sorted(os.listdir(cache)) == files


def test_get_vocabulary():
    lvis = get_vocabulary("lvis")
    assert len(lvis) == 1203 and lvis[0] == "aerosol_can" and len(set(lvis)) == 1203
    coco = get_vocabulary("coco")
    assert len(coco) == 80 and coco[0] == "person" and coco[-1] == "toothbrush"
    o365 = get_vocabulary("objects365")
    assert len(o365) == 365 == len(set(o365)) and o365 == list(OBJECTS365_CLASSES)
    assert o365[:3] == ["person", "sneakers", "chair"] and o365[-1] == "flashlight"
    assert all(n == n.strip() and n for n in o365)
    assert get_vocabulary("custom", " cat, dog ,, sofa ,cat") == ["cat", "dog", "sofa"]
    assert get_vocabulary("custom", ["cat,dog", "sofa"]) == ["cat", "dog", "sofa"]
    with pytest.raises(ValueError, match="empty"):
        get_vocabulary("custom", " , ")
    with pytest.raises(ValueError, match="lvis, coco, objects365, custom"):
        get_vocabulary("imagenet")


def test_demo_argument_errors(tmp_path):
    demo = _load_demo_module()

    def run(*argv):
        return demo.run(demo.get_parser().parse_args(list(argv)))

    photo = tmp_path / "a.png"
    cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="--boxes boxes.json .* or --detector-config"):
        run("--input", str(photo))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a.png": [[0, 0, 5, 5], [1, 2, 3]]}))
    with pytest.raises(ValueError, match=r"entry 'a.png', box 1"):
        run("--input", str(photo), "--boxes", str(bad))
    bad.write_text(json.dumps({"a.png": [[10, 10, 5, 5]]}))
    with pytest.raises(ValueError, match=r"entry 'a.png', box 0: .*XYWH"):
        run("--input", str(photo), "--boxes", str(bad))
    bad.write_text(json.dumps([[0, 0, 5, 5]]))
    with pytest.raises(ValueError, match="mapping image file names"):
        run("--input", str(photo), "--boxes", str(bad))
    with pytest.raises(ValueError, match="only used with --vocabulary custom"):
        run("--input", str(photo), "--boxes", str(bad), "--vocabulary", "coco", "--custom-vocabulary", "cat")
    bad.write_text(json.dumps({"a.png": [[0, 0, 5, 5, 1.5]]}))
    with pytest.raises(ValueError, match=r"entry 'a.png', box 0: score 1.5 is not in \[0, 1\]"):
        run("--input", str(photo), "--boxes", str(bad))
    with pytest.raises(ValueError, match="write model_zoo:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"):
        run("--input", str(photo), "--detector-config", "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    with pytest.raises(ValueError, match="no such file"):
        run("--input", str(photo), "--detector-config", str(tmp_path / "nope.yaml"))
    relabel = os.path.join(REPO_ROOT, "projects", "RegionSpot", "configs", "Detector-Relabel", "RegionSpot-tiny_relabel-mask-rcnn_shapes.yaml")
    bad.write_text(json.dumps({"a.png": [[0, 0, 5, 5]]}))
    with pytest.raises(ValueError, match="--boxes needs a config of the RegionSpot meta-architecture"):
        run("--config-file", relabel, "--input", str(photo), "--boxes", str(bad))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    bad.write_text(json.dumps({"broken.png": [[0, 0, 4, 4]]}))
    with pytest.raises(ValueError, match="Cannot read image " + re.escape(str(broken))):
        run("--input", str(broken), "--boxes", str(bad))
    broken.unlink()
    files, unmatched = demo.expand_inputs([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "none*.jpg")])
    assert files == [str(tmp_path / "a.png")] and unmatched == [str(tmp_path / "none*.jpg")]
