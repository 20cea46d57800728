"""ONNX export (tiny models): the graphs with ONNX Runtime reproduce RegionSpotPredictor without torch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg

import regionspot
from regionspot.export import OnnxRegionSpotPredictor, export_model
from regionspot.export.image_ops import resize_bilinear, sam_resize
from regionspot.export.onnx_graphs import model_fingerprints
from regionspot.export.tokenizer import ClipTokenizer

pytest.importorskip("onnxruntime")

VOCAB = ["person", "rocket", "flag", "sky"]
BOXES = np.array([[10, 20, 100, 150], [0, 0, 240, 200], [50.5, 60.2, 70.1, 90.9], [120, 30, 239, 199], [5, 150, 60, 199]])
POINTS = dict(point_coords=[[[30, 40], [100, 120]], [[5, 5], [0, 0]]], point_labels=[[1, 0], [1, -1]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    predictor = regionspot.RegionSpotPredictor(tiny_cfg())
    out = str(tmp_path_factory.mktemp("onnx"))
    export_model(predictor, out, variant="tiny")
    return predictor, out


@pytest.fixture(scope="module")
def pair(exported, photo):
    predictor, out = exported
    onnx = OnnxRegionSpotPredictor(out, threads=1)
    for p in (predictor, onnx):
        p.set_vocabulary(VOCAB)
        p.set_image(photo)
    return predictor, onnx


def _compare(a, b):
    for key in ("logits", "scores", "embeddings"):
        np.testing.assert_allclose(b[key], a[key].numpy(), atol=1e-4, rtol=0, err_msg=key)
    np.testing.assert_allclose(b["mask_scores"], a["mask_scores"].numpy(), atol=1e-5, rtol=0)
    assert (b["classes"] == a["classes"].numpy()).all()
    assert (b["empty_box"] == a["empty_box"].numpy()).all()
    assert b["masks"].shape == tuple(a["masks"].shape)
    assert (b["masks"] != a["masks"].numpy()).mean() <= 1e-4


@pytest.mark.parametrize("prompts", ["boxes", "points", "boxes_and_points"])
def test_onnx_equals_torch_predictor(pair, prompts):
    predictor, onnx = pair
    kw = {"boxes": dict(boxes=BOXES), "points": POINTS,
          "boxes_and_points": dict(boxes=BOXES[:2], **POINTS)}[prompts]
    _compare(predictor.predict(**kw, return_embeddings=True), onnx.predict(**kw, return_embeddings=True))


def test_vocabulary_change_without_reexport(pair):
    predictor, onnx = pair
    vocab = ["astronaut", "suit", "helmet", "window", "tree", "cloud", "car"]
    try:
        for p in (predictor, onnx):
            p.set_vocabulary(vocab)
        np.testing.assert_allclose(onnx.text_embeddings, predictor.head.classifier.text_embeddings.numpy(), atol=1e-5)
        a, b = predictor.predict(BOXES, return_embeddings=True), onnx.predict(BOXES, return_embeddings=True)
        assert b["logits"].shape == (len(BOXES), len(vocab))
        _compare(a, b)
    finally:
        for p in (predictor, onnx):
            p.set_vocabulary(VOCAB)


def test_manifest(exported):
    predictor, out = exported
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    head = predictor.head
    assert m["format"] == "regionspot-onnx" and m["variant"] == "tiny" and m["opset"] == 17
    assert m["sam"]["resize_longest_side"] == 256 and m["sam"]["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert m["clip"]["input_size"] == 128 and m["clip"]["antialias"] is False
    assert m["clip"]["pixel_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert m["fingerprints"] == {k + "_state_dict_sha256": v for k, v in model_fingerprints(head).items()}
    assert len(m["prompt_templates"]) == 81 and m["baked_vocabulary"] is None
    for name in m["graphs"].values():
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_baked_vocabulary_cli(tmp_path, photo):
    out = str(tmp_path / "baked")
    subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "export_onnx.py"), "--config-file", TINY_CONFIG,
         "--output", out, "--bake-vocabulary", "cat,dog,sky"],
        check=True, capture_output=True, cwd=REPO_ROOT,
    )
    torch.manual_seed(0)  # the tool seeds the random stand-in head the same way
    predictor = regionspot.RegionSpotPredictor(tiny_cfg())
    predictor.set_vocabulary(["cat", "dog", "sky"])
    predictor.set_image(photo)
    onnx = OnnxRegionSpotPredictor(out, threads=1)
    assert [i.name for i in onnx.sessions["head"].get_inputs()] == ["tokens", "clip_features"]
    onnx.set_image(photo)
    np.testing.assert_allclose(onnx.predict(BOXES)["logits"], predictor.predict(BOXES)["logits"].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="baked in"):
        onnx.set_vocabulary(["cat", "dog"])


def test_tokenizer_equals_clip(exported):
    import clip

    texts = ["a photo of a cat.", "Hello, World!! it's 3.14 &amp; <b>café</b>", "  many   spaces_and-dashes a--b",
             "日本語のテキスト", "emoji 🐱", "don't you'll we've", "a jpeg corrupted photo of the traffic_light."]
    tokenizer = ClipTokenizer(os.path.join(exported[1], "bpe_simple_vocab_16e6.txt.gz"))
    assert (tokenizer(texts) == clip.tokenize(texts).numpy()).all()


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_torch(antialias):
    rng = np.random.default_rng(0)
    for shape, size in [((3, 200, 240), (128, 128)), ((3, 37, 91), (224, 224)), ((2, 256, 256), (1024, 700))]:
        x = rng.random(shape, dtype=np.float32)
        ref = F.interpolate(torch.from_numpy(x)[None], size, mode="bilinear", align_corners=False, antialias=antialias)
        np.testing.assert_allclose(resize_bilinear(x, size, antialias), ref[0].numpy(), atol=1e-5)


def test_sam_resize_equals_segment_anything(photo):
    from segment_anything.utils.transforms import ResizeLongestSide

    for long_side in (256, 1024):
        assert (sam_resize(photo, long_side) == ResizeLongestSide(long_side).apply_image(photo)).all()


_TORCH_FREE = r"""
import importlib.abc, sys
HIDDEN = ("torch", "detectron2", "clip", "segment_anything", "torchvision")
class Hide(importlib.abc.MetaPathFinder):  # as on a machine where they are not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
import numpy as np
from regionspot.export import OnnxRegionSpotPredictor
p = OnnxRegionSpotPredictor(sys.argv[1], threads=1)
p.set_vocabulary(["cat", "dog"])
p.set_image(np.full((50, 60, 3), 128, np.uint8))
out = p.predict([[1, 2, 30, 40]], point_coords=[[[10, 10]]], point_labels=[[1]])
assert out["masks"].shape == (1, 50, 60) and out["logits"].shape == (1, 2)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HIDDEN))
print("LOADED", loaded)
"""


def test_onnx_predictor_needs_no_torch(exported):
    r = subprocess.run([sys.executable, "-c", _TORCH_FREE, exported[1]], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED []" in r.stdout
