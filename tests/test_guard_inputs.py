"""
Bad input never gives silent garbage: every input a user can get wrong (boxes, point prompts, images,
vocabularies) is checked where it enters, and either gives the result of its canonical form or a
ValueError naming the input and the fix. Tiny random-weight models (conftest); the shared session
predictor is always left with its original vocabulary and settings.
"""
import logging

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances

import regionspot
from conftest import tiny_cfg
from regionspot.modeling.input_checks import check_text_embeddings, image_to_rgb_uint8

# The photo fixture is 200 x 240 (H x W).
BOXES = np.array([[10.0, 10.0, 120.0, 150.0], [60.0, 30.0, 230.0, 190.0], [100.0, 100.0, 140.0, 130.0]])
VOCAB = ["cat", "dog", "astronaut", "flag"]


@pytest.fixture
def pred(predictor, photo):
    """The session predictor with ``photo`` set; vocabulary and policies restored afterwards."""
    names, policy, score = predictor.class_names, predictor.empty_boxes, predictor.head.classifier.class_score
    predictor.set_image(photo)
    yield predictor
    predictor.empty_boxes, predictor.head.classifier.class_score = policy, score
    if predictor.class_names != names:
        predictor.set_vocabulary(names)


def _chw(image):
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _regions(image_size, boxes=None, **fields):
    r = Instances(image_size)
    if boxes is not None:
        r.proposal_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    for k, v in fields.items():
        r.set(k, torch.as_tensor(v))
    return r


# ------------------------------------------------------------------------------------------------
# Boxes through the predictor
def _with_row(row, value):
    b = BOXES.copy()
    b[row] = value
    return b


@pytest.mark.parametrize(
    "boxes, patterns",
    [
        (_with_row(1, [60.0, np.nan, 230.0, 190.0]), [r"rows \[1\] are not finite", "nan", "NaN"]),
        (_with_row(2, [100.0, 100.0, np.inf, 130.0]), [r"rows \[2\] are not finite", "inf"]),
        (_with_row(0, [120.0, 10.0, 10.0, 150.0]), [r"rows \[0\] have x1 < x0", r"\[x0, y0, x1, y1\]", "XYWH"]),
        (_with_row(1, [60.0, 190.0, 230.0, 30.0]), [r"rows \[1\] have x1 < x0 or y1 < y0", "XYWH"]),
        (np.array([10.0, 10.0, 50.0, 50.0]), [r"one box of shape \[4\]", r"\[\[x0, y0, x1, y1\]\]"]),
        (np.zeros((3, 5)), [r"boxes must be \[N, 4\] XYXY", r"\[3, 5\]"]),
        ([[1, 2, 3, "x"]], ["must be numbers", "could not read it"]),
    ],
    ids=["nan", "inf", "x-inverted", "y-inverted", "one-box-1d", "wrong-width", "not-numbers"],
)
def test_bad_boxes_are_refused(pred, boxes, patterns):
    with pytest.raises(ValueError) as e:
        pred.predict(boxes)
    for p in patterns:
        assert e.match(p), (p, str(e.value))


def test_nan_box_no_longer_poisons_the_image(pred):
    """Regression: one NaN box used to make every logit of every region NaN, without an error."""
    bad = np.concatenate([BOXES, [[50.0, 50.0, np.nan, 80.0]]])
    with pytest.raises(ValueError, match=r"rows \[3\] are not finite \(3: \[50\.0, 50\.0, nan, 80\.0\]\)"):
        pred.predict(bad)
    # The valid boxes alone, after the refused one is removed: finite, and what they always were.
    kept = pred.predict(bad[:3])
    assert torch.isfinite(kept["logits"]).all() and torch.isfinite(kept["scores"]).all()
    torch.testing.assert_close(kept["logits"], pred.predict(BOXES)["logits"], rtol=0, atol=0)
    assert not kept["empty_box"].any()


@pytest.mark.parametrize(
    "box, kind",
    [([50.0, 50.0, 50.0, 90.0], "zero width"), ([50.0, 70.0, 90.0, 70.0], "zero height"),
     ([300.0, 20.0, 340.0, 60.0], "right of the image"), ([-80.0, -60.0, -10.0, -5.0], "above-left")],
)
def test_empty_boxes_warn_and_are_flagged(pred, caplog, box, kind):
    boxes = np.concatenate([BOXES, [box]])
    with caplog.at_level(logging.WARNING, logger="regionspot"):
        out = pred.predict(boxes)
    assert "boxes rows [3] are empty once clipped to the 200x240 (HxW) image" in caplog.text, kind
    assert out["empty_box"].tolist() == [False, False, False, True]
    assert torch.isfinite(out["logits"]).all() and out["logits"].shape[0] == 4


@pytest.mark.parametrize("box", [[50.0, 50.0, 50.0, 90.0], [300.0, 20.0, 340.0, 60.0]])
def test_empty_boxes_refused_with_error_policy(pred, box):
    pred.empty_boxes = "error"
    with pytest.raises(ValueError, match=r"boxes rows \[3\] are empty once clipped.*overlap the image"):
        pred.predict(np.concatenate([BOXES, [box]]))


def test_empty_box_policy_is_checked(cfg):
    with pytest.raises(ValueError, match="empty_boxes='drop'"):
        regionspot.RegionSpotPredictor(cfg, empty_boxes="drop")


def test_partly_outside_box_is_used_as_given(pred, caplog):
    boxes = _with_row(2, [200.0, 150.0, 300.0, 260.0])  # crosses the right and bottom edges
    with caplog.at_level(logging.WARNING, logger="regionspot"):
        out = pred.predict(boxes)
    assert "empty once clipped" not in caplog.text and not out["empty_box"].any()
    clipped = pred.predict(_with_row(2, [200.0, 150.0, 240.0, 200.0]))["logits"]
    assert not torch.equal(out["logits"], clipped)  # not clipped behind the user's back


# ------------------------------------------------------------------------------------------------
# Boxes through the model: given boxes (RegionSpot.inference(detected_instances=...)) and proposals
def test_given_nan_box_raises(pred, photo):
    given = Instances(photo.shape[:2])
    given.pred_boxes = Boxes(torch.as_tensor(_with_row(1, [np.nan] * 4), dtype=torch.float32))
    with pytest.raises(ValueError, match=r"pred_boxes of image 0 of the batch rows \[1\] are not finite"):
        pred.model.inference([{"image": _chw(photo)}], detected_instances=[given])


def test_given_inverted_box_raises(pred, photo):
    given = Instances(photo.shape[:2])
    given.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 60.0], [30.0, 40.0, 20.0, 30.0]]))  # XYWH
    with pytest.raises(ValueError, match=r"pred_boxes of image 0 of the batch rows \[1\] have x1 < x0.*XYWH"):
        pred.model.inference([{"image": _chw(photo)}], detected_instances=[given])


def test_given_empty_boxes_are_returned_flagged_in_order(pred, photo, caplog):
    boxes = np.concatenate([BOXES[:1], [[300.0, 20.0, 340.0, 60.0]], BOXES[1:2], [[40.0, 40.0, 40.0, 80.0]]])
    given = Instances(photo.shape[:2])
    given.pred_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    with caplog.at_level(logging.WARNING, logger="regionspot"):
        (out,) = pred.model.inference([{"image": _chw(photo)}], detected_instances=[given])
    inst = out["instances"]
    assert len(inst) == 4 and inst.empty_box.tolist() == [False, True, False, True]
    assert "pred_boxes of image 0 of the batch rows [1, 3] are empty once clipped" in caplog.text
    assert torch.isfinite(inst.scores).all()
    # The same scores as the predictor gives for the same boxes (one output per given box, in order).
    torch.testing.assert_close(inst.scores, pred.predict(boxes)["scores"].max(1).values, rtol=0, atol=1e-6)


def test_given_boxes_need_one_set_per_image(pred, photo):
    given = Instances(photo.shape[:2])
    given.pred_boxes = Boxes(torch.as_tensor(BOXES, dtype=torch.float32))
    with pytest.raises(ValueError, match="1 images but 2 detected_instances"):
        pred.model.inference([{"image": _chw(photo)}], detected_instances=[given, given])


@pytest.mark.parametrize(
    "boxes, fields, pattern",
    [
        (_with_row(0, [np.nan] * 4), {}, r"proposal_boxes of image 0 of the batch rows \[0\] are not finite"),
        (_with_row(2, [140.0, 100.0, 100.0, 130.0]), {},
         r"proposal_boxes of image 0 of the batch rows \[2\] have x1 < x0"),
        (BOXES, {"objectness_logits": [0.0, float("nan"), 1.0]},
         r"objectness_logits of image 0 of the batch are NaN at rows \[1\]"),
    ],
    ids=["nan-box", "inverted-box", "nan-objectness"],
)
def test_bad_proposals_are_refused(pred, photo, boxes, fields, pattern):
    images = ImageList.from_tensors([_chw(photo).float()])
    with pytest.raises(ValueError, match=pattern):
        pred.head(images, {}, [_regions(photo.shape[:2], boxes, **fields)], None)


def test_empty_proposals_are_prompts_and_their_detections_dropped(pred, photo, caplog):
    """The authors' evaluation protocol: every proposal is a prompt, empty ones give no detection."""
    boxes = np.concatenate([BOXES, [[300.0, 20.0, 340.0, 60.0], [50.0, 50.0, 50.0, 90.0]]])
    images = ImageList.from_tensors([_chw(photo).float()])
    with caplog.at_level(logging.WARNING, logger="regionspot"):
        (res,), _ = pred.head(images, {}, [_regions(photo.shape[:2], boxes)], None)
    assert "empty once clipped" not in caplog.text  # documented protocol, not a user error
    kept = {tuple(b) for b in res.pred_boxes.tensor.tolist()}
    assert kept == {tuple(b) for b in BOXES.astype(np.float32).tolist()}
    assert not res.has("empty_box")


def test_bad_gt_boxes_are_refused_in_training(pred, photo):
    images = ImageList.from_tensors([_chw(photo).float()])
    target = Instances(photo.shape[:2])
    target.gt_boxes = Boxes(torch.as_tensor(_with_row(2, [np.inf, 0, 10, 10]), dtype=torch.float32))
    target.gt_classes = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"gt_boxes of image 0 of the batch rows \[2\] are not finite"):
        pred.head.losses(images, [target])


# ------------------------------------------------------------------------------------------------
# Point prompts
PTS = np.array([[[50.0, 60.0]], [[150.0, 100.0]]])
LABELS = np.array([[1], [1]])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(point_coords=np.array([[[50.0, np.nan]], [[150.0, 100.0]]]), point_labels=LABELS),
         r"non-finite coordinates at \(region, point\) \[0, 0\]: \[50\.0, nan\]"),
        (dict(point_coords=PTS, point_labels=np.array([[1], [2]])),
         r"1 \(foreground\), 0 \(background\) or -1.*\[1, 0\]: 2"),
        (dict(point_coords=PTS, point_labels=np.array([[1], [0.5]])), r"-1 \(padding, ignored\), got \[1, 0\]: 0\.5"),
        (dict(point_coords=PTS, point_labels=np.array([1, 1])),
         r"point_labels must be \[N, P\] = \[2, 1\].*got shape \[2\]"),
        (dict(point_coords=PTS, point_labels=np.ones((2, 2))), r"point_labels must be \[N, P\] = \[2, 1\]"),
        (dict(point_coords=PTS[0], point_labels=LABELS[0]), r"\[N, P, 2\].*point_coords\[None\]"),
        (dict(point_coords=np.zeros((2, 1, 3)), point_labels=LABELS), r"point_coords must be \[N, P, 2\]"),
        (dict(point_coords=PTS), r"point_coords need point_labels"),
        (dict(point_labels=LABELS), r"point_labels given without point_coords"),
        (dict(point_coords=np.array([[[50.0, 60.0]], [[250.0, 100.0]]]), point_labels=LABELS),
         r"points outside the 200x240 \(HxW\) image at \(region, point\) \[1, 0\]: \[250\.0, 100\.0\].*XY"),
        (dict(point_coords=np.array([[[50.0, -1.0]], [[150.0, 100.0]]]), point_labels=LABELS), r"outside the 200x240"),
        (dict(point_coords=np.array([[[50.0, 60.0], [0, 0]], [[0, 0], [0, 0]]]),
              point_labels=np.array([[1, -1], [-1, -1]])),
         r"Regions \[1\] have only padding points \(label -1\) and no box"),
        (dict(boxes=BOXES, point_coords=PTS, point_labels=LABELS), r"3 boxes and 2 regions of points"),
    ],
    ids=["nan", "label-2", "label-half", "labels-1d", "labels-wider", "one-region-2d", "xyz", "no-labels",
         "no-coords", "x-outside", "y-negative", "padding-only", "count-mismatch"],
)
def test_bad_points_are_refused(pred, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        pred.predict(**kwargs)


def test_padding_label_is_accepted(pred):
    """-1 is SAM's 'not a point': regions with fewer clicks share one array; its coords are ignored."""
    coords = np.array([[[50.0, 60.0], [999.0, -5.0]], [[150.0, 100.0], [120.0, 90.0]]])
    labels = np.array([[1, -1], [1, 0]])
    out = pred.predict(point_coords=coords, point_labels=labels)
    assert torch.isfinite(out["logits"]).all() and out["logits"].shape[0] == 2
    moved = coords.copy()
    moved[0, 1] = [3.0, 4.0]  # another position for the padding point: the same answer
    torch.testing.assert_close(pred.predict(point_coords=moved, point_labels=labels)["logits"], out["logits"])


def test_points_outside_image_refused_in_head(pred, photo):
    regions = _regions(photo.shape[:2], point_coords=[[[10.0, 500.0]]], point_labels=[[1]])
    with pytest.raises(ValueError, match=r"point_coords has points outside the 200x240 \(HxW\) image"):
        pred.head.recognize(photo, regions, per_region=True)


# ------------------------------------------------------------------------------------------------
# Images
def _photo_u16(photo):
    return photo.astype(np.uint16) * 257


@pytest.mark.parametrize(
    "make, patterns",
    [
        (lambda p: p.astype(np.float32) / 255,
         [r"\[H, W, 3\] uint8", r"\[0, 1\]", r"\(image \* 255\)\.round\(\)\.astype\(np\.uint8\)"]),
        (lambda p: p.astype(np.float64), [r"dtype float64", r"image\.round\(\)\.astype\(np\.uint8\)"]),
        (_photo_u16, [r"16-bit \(uint16", r"/ 257\)", r"regionspot\.data\.images\.read_image"]),
        (lambda p: p.astype(np.int64), [r"dtype int64", r"image\.astype\(np\.uint8\)"]),
        (lambda p: p[..., 0] > 128, [r"dtype bool"]),
        (lambda p: np.ascontiguousarray(p.transpose(2, 0, 1)),
         [r"channel-first", r"np\.transpose\(image, \(1, 2, 0\)\)"]),
        (lambda p: p[None], [r"batch of one: pass image\[0\]"]),
        (lambda p: p[:0], [r"is empty \(shape \[0, 240, 3\]\)"]),
        (lambda p: p[:, :0], [r"is empty"]),
        (lambda p: np.concatenate([p, p[..., :2]], axis=2), [r"must be \[H, W, 3\].*got shape \[200, 240, 5\]"]),
        (lambda p: p[0, 0], [r"must be \[H, W, 3\]"]),
    ],
    ids=["float01", "float255", "uint16", "int64", "bool", "chw", "batch", "zero-height", "zero-width",
         "5-channels", "1d"],
)
def test_bad_images_are_refused(pred, photo, make, patterns):
    with pytest.raises(ValueError) as e:
        pred.set_image(make(photo))
    for p in patterns:
        assert e.match(p), (p, str(e.value))


def test_refused_image_keeps_the_previous_one(pred, photo):
    before = pred.predict(BOXES)["logits"]
    with pytest.raises(ValueError):
        pred.set_image(photo.astype(np.float32))
    torch.testing.assert_close(pred.predict(BOXES)["logits"], before, rtol=0, atol=0)


def _gray(photo):
    return photo[..., 1]


def _rgba(photo):
    alpha = np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None, :, None].repeat(photo.shape[0], 0)
    return np.concatenate([photo, alpha], axis=2)


@pytest.mark.parametrize(
    "make, image_format, canonical",
    [
        (_gray, "RGB", lambda p: np.repeat(_gray(p)[..., None], 3, axis=2)),
        (lambda p: _gray(p)[..., None], "RGB", lambda p: np.repeat(_gray(p)[..., None], 3, axis=2)),
        (lambda p: np.stack([_gray(p), _rgba(p)[..., 3]], axis=2), "RGB",
         lambda p: np.repeat(_gray(p)[..., None], 3, axis=2)),
        (_rgba, "RGB", lambda p: p),
        (lambda p: _rgba(p)[..., [2, 1, 0, 3]], "BGR", lambda p: p),  # BGRA, as cv2.IMREAD_UNCHANGED reads
        (lambda p: p[:, ::-1], "RGB", lambda p: np.ascontiguousarray(p[:, ::-1])),  # negative strides
        (lambda p: np.asfortranarray(p), "RGB", lambda p: p),
        (lambda p: torch.as_tensor(p), "RGB", lambda p: p),
    ],
    ids=["gray-hw", "gray-hw1", "gray-alpha", "rgba", "bgra", "flipped-view", "fortran", "cpu-tensor"],
)
def test_converted_images_equal_their_canonical_form(pred, photo, make, image_format, canonical):
    converted = image_to_rgb_uint8(make(photo), image_format)
    expected = canonical(photo)
    assert converted.dtype == np.uint8 and converted.flags["C_CONTIGUOUS"]
    assert np.array_equal(converted, expected)
    pred.set_image(make(photo), image_format)
    got = pred.predict(BOXES)["logits"]
    pred.set_image(expected)
    torch.testing.assert_close(got, pred.predict(BOXES)["logits"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Vocabularies
@pytest.mark.parametrize(
    "names, pattern",
    [
        (None, r"The vocabulary is None"),
        ("cat", r"single string 'cat', which would be read letter by letter"),
        ([], r"The vocabulary is empty"),
        (["cat", None], r"not strings \(index: value\): 1: None \(NoneType\)"),
        (["cat", b"dog"], r"1: b'dog' \(bytes\)"),
        (["cat", 1.5], r"1: 1\.5 \(float\)"),
        (["cat", True], r"1: True \(bool\)"),
        (["cat", ""], r"empty or whitespace-only names at indices \[1\]"),
        (["cat", "  "], r"empty or whitespace-only names at indices \[1\]"),
        (["cat", "dog", "cat"], r"more than once.*'cat' \(index 0\) = 'cat' \(index 2\)"),
        (["Cat", "dog", "cat "], r"'Cat' \(index 0\) = 'cat ' \(index 2\)"),
        (["wall-other-merged", "wall"], r"'wall-other-merged' \(index 0\) = 'wall' \(index 1\)"),
    ],
    ids=["none", "str", "empty", "none-entry", "bytes", "float", "bool", "blank", "whitespace", "repeat",
         "case", "panoptic-suffix"],
)
def test_bad_vocabularies_are_refused(pred, names, pattern):
    before = pred.class_names
    with pytest.raises(ValueError, match=pattern):
        pred.set_vocabulary(names)
    assert pred.class_names == before
    with pytest.raises(ValueError, match=pattern.replace("The vocabulary", "The vocabulary 'train'")):
        pred.head.add_vocabulary("train", names)
    assert "train" not in pred.head.classifier.vocabularies


def test_integer_names_are_converted_with_a_warning(pred, caplog):
    with caplog.at_level(logging.WARNING, logger="regionspot"):
        pred.set_vocabulary(["cat", 7, np.int64(8)])
    assert pred.class_names == ["cat", "7", "8"]
    assert "integer class names at indices [1, 2] converted to text" in caplog.text


def test_one_class_softmax_is_refused_by_the_predictor(pred):
    before = pred.class_names
    with pytest.raises(ValueError, match=r"one class \('cat'\).*exactly 1\.0 for every region.*'background'.*sigmoid"):
        pred.set_vocabulary(["cat"])
    assert pred.class_names == before


def test_one_class_softmax_warns_in_the_head_and_predict_refuses(pred, photo, caplog):
    with caplog.at_level(logging.WARNING, logger="regionspot"):
        pred.head.set_vocabulary(["cat"])
    assert "exactly 1.0 for every region" in caplog.text and "GT boxes as prompts, 100" in caplog.text
    # What the warning is about: the evaluation path scores every region 1.0.
    inst = pred.head.recognize(photo, _regions(photo.shape[:2], BOXES), per_region=True)
    assert torch.equal(inst.scores, torch.ones(3))
    with pytest.raises(ValueError, match="exactly 1.0 for every region"):
        pred.predict(BOXES)


def test_sigmoid_class_scores(pred):
    pred.head.classifier.class_score = "sigmoid"
    pred.set_vocabulary(["cat"])  # one class is meaningful per class
    out = pred.predict(BOXES)
    torch.testing.assert_close(out["scores"], out["logits"].sigmoid(), rtol=0, atol=0)
    pred.set_vocabulary(VOCAB)
    out = pred.predict(BOXES)
    torch.testing.assert_close(out["scores"], out["logits"].sigmoid(), rtol=0, atol=0)
    assert torch.equal(out["classes"], out["logits"].argmax(1))


def test_class_score_from_config():
    cfg = tiny_cfg()
    cfg.MODEL.REGIONSPOT.SCORE.CLASS_SCORE = "sigmoid"  # read with a default where the key is not declared
    assert build_model(cfg).roi_heads.classifier.class_score == "sigmoid"
    cfg.MODEL.REGIONSPOT.SCORE.CLASS_SCORE = "softmax2"
    with pytest.raises(ValueError, match=r"SCORE.CLASS_SCORE='softmax2'.*\('softmax', 'sigmoid'\)"):
        build_model(cfg)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda e: e[:2], r"shape \[2, \d+\] do not fit 4 class names"),
        (lambda e: torch.cat([e[:3], torch.full_like(e[3:], float("nan"))]), r"rows \[3\] are not finite"),
        (lambda e: e * 3, r"rows \[0, 1, 2, 3\] are not L2-normalised.*embeddings\.norm\(dim=1, keepdim=True\)"),
        (lambda e: e.numpy(), r"must be a torch\.Tensor"),
    ],
    ids=["shape", "nan", "unnormalised", "numpy"],
)
def test_bad_text_embeddings_are_refused(pred, make, pattern):
    good = torch.nn.functional.normalize(torch.randn(4, pred.head.clip.embed_dim), dim=1)
    check_text_embeddings(good, 4, pred.head.clip.embed_dim)
    with pytest.raises(ValueError, match=pattern):
        pred.set_vocabulary(VOCAB, make(good))
    with pytest.raises(ValueError, match=pattern):
        pred.head.add_vocabulary("train", VOCAB, make(good))


def test_add_vocabulary_key_must_be_a_name(pred):
    with pytest.raises(ValueError, match="key must be a non-empty str"):
        pred.head.add_vocabulary(None, VOCAB)
