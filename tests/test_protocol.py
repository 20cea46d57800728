"""
The authors' LVIS evaluation protocol (800/1333 resize, their box scaling, mask resize and scoring
order), checked against an independent step-by-step computation of their evaluation path
(``regionspot-reference.md`` section 4) with stock ``segment_anything`` / ``clip`` /
``torchvision`` / PIL calls, and against the predictor run on the image resized the same way.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from segment_anything import SamPredictor
from torch.nn import functional as F

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from conftest import tiny_cfg
from regionspot import RegionSpotPredictor
from regionspot.data import build_regionspot_test_mapper
from regionspot.modeling import build_clip, build_sam, select_detections
from regionspot.modeling.clip_features import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

VOCAB = [f"class {i}" for i in range(30)]
NUM_BOXES = 40  # 40 x 30 = 1200 pairs > 900: the top-k and the box-score order matter


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    """A real photo (scikit-image), non-square so the 800 resize rounds, saved losslessly."""
    from skimage import data

    image = np.ascontiguousarray(data.astronaut()[37:337, 20:471])  # 300 x 451
    path = tmp_path_factory.mktemp("protocol") / "astronaut.png"
    Image.fromarray(image).save(path)
    return str(path), image


def _boxes_and_scores(height, width, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [width - 20, height - 20], size=(NUM_BOXES, 2))
    wh = rng.uniform(10, [width / 2, height / 2], size=(NUM_BOXES, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[3] = boxes[7]  # a duplicate (GLIP writes one entry per class)
    boxes[5] = [width - 30, 10, width + 40, 60]  # crosses the right edge: kept unclipped
    boxes[9] = [width + 5, 20, width + 50, 80]  # entirely outside: its detections are dropped
    scores = rng.uniform(0.05, 0.95, size=NUM_BOXES)
    return boxes.astype(np.float32), scores.astype(np.float32)


def _cfg(*opts):
    cfg = tiny_cfg(
        "INPUT.MIN_SIZE_TEST", 800, "INPUT.MAX_SIZE_TEST", 1333,
        "MODEL.LOAD_PROPOSALS", True, "MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS",
        "MODEL.REGIONSPOT.VOCAB.SOURCE", "custom", "MODEL.REGIONSPOT.VOCAB.CUSTOM", VOCAB,
        "MODEL.REGIONSPOT.SCORE.TOPK", 900, "TEST.DETECTIONS_PER_IMAGE", 300,
        "MODEL.REGIONSPOT.MASK.SECOND_PASS_MIN_PROMPTS", 0, *opts,
    )
    cfg.freeze()
    return cfg


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _dataset_dict(path, image, boxes, scores):
    logits = np.log(scores) - np.log1p(-scores)
    order = np.argsort(-logits, kind="stable")  # as detectron2's load_proposals_into_dataset sorts
    return {
        "file_name": path, "height": image.shape[0], "width": image.shape[1], "image_id": 1,
        "proposal_boxes": boxes[order], "proposal_objectness_logits": logits[order].astype(np.float32),
        "proposal_bbox_mode": BoxMode.XYXY_ABS,
    }


def _ours(model, cfg, record):
    inputs = [build_regionspot_test_mapper(cfg)(record)]
    with torch.no_grad():
        return inputs[0], model.inference(inputs)[0]["instances"]


# ------------------------------------------------------------------------------------------------
# The authors' evaluation path, step by step, from stock parts
def _resize_shortest_edge_shape(h, w, short, max_size):
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


def _stock_clip_tokens(clip_model, view):
    visual = clip_model.visual
    x = visual.conv1(view)
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g0 = int(round((pos.shape[0] - 1) ** 0.5))
    patch = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + pos
    x = visual.transformer(visual.ln_pre(x).permute(1, 0, 2))
    return x.permute(1, 0, 2)


@torch.no_grad()
def authors_evaluation(model, cfg, image, boxes, box_scores, antialias=False):
    """Their eval forward for one image: detections in the original frame, masks [K, H, W]."""
    rs = cfg.MODEL.REGIONSPOT
    head = model.roi_heads
    H, W = image.shape[:2]
    # 1. detectron2's default test mapper: ResizeShortestEdge(800, 1333), PIL bilinear on uint8.
    h8, w8 = _resize_shortest_edge_shape(H, W, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    img800 = np.asarray(Image.fromarray(image).resize((w8, h8), Image.BILINEAR))
    # 2. CLIP view: torchvision's tensor resize of img800 / 255, then CLIP's mean/std.
    view = TF.resize(torch.from_numpy(img800).permute(2, 0, 1).float() / 255, [rs.CLIP.INPUT_SIZE] * 2,
                     antialias=antialias)
    view = TF.normalize(view, CLIP_PIXEL_MEAN, CLIP_PIXEL_STD)[None]
    clip_model = build_clip(rs.CLIP.TYPE, "", True, rs.FROZEN.SEED + 1)
    clip_tokens = _stock_clip_tokens(clip_model, view)
    # 3. SAM view: the stock predictor on img800.
    sam = build_sam(rs.SAM.TYPE, "", True, rs.FROZEN.SEED)
    predictor = SamPredictor(sam)
    predictor.set_image(img800)
    # 4. Boxes into the 800 frame with the x/y ratios swapped, then SAM's apply_boxes.
    b800 = boxes.astype(np.float64) * np.array([h8 / H, w8 / W, h8 / H, w8 / W])
    captured = []
    hook = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.append(o[0][:, 1]))
    mask_logits, _, _ = predictor.predict_torch(
        None, None, boxes=torch.as_tensor(predictor.transform.apply_boxes(b800, (h8, w8)), dtype=torch.float),
        multimask_output=False, return_logits=True,
    )
    hook.remove()
    tokens = captured[0]
    # 5. Region embeddings -> logits -> softmax.
    emb = head.fusion(tokens[None], clip_tokens)[0]
    emb = emb / (emb.norm(dim=-1, keepdim=True) + 1e-7)
    text = head.classifier.text_embeddings / head.classifier.text_embeddings.norm(dim=-1, keepdim=True)
    probs = (head.classifier.logit_scale * emb @ text.t()).softmax(dim=-1)
    # 6. Top 900 of the flattened probabilities, THEN times the box score.
    C = probs.shape[1]
    top, flat = probs.flatten().topk(min(rs.SCORE.TOPK, probs.numel()))
    regions, classes = flat // C, flat % C
    scores = top * torch.as_tensor(box_scores)[regions]
    # 7. Back to the original frame: boxes scaled, clipped, empty ones dropped; masks thresholded
    # at the 800 scale and resized with nearest neighbour.
    out_boxes = torch.as_tensor(b800, dtype=torch.float32)[regions] * torch.tensor([W / w8, H / h8] * 2)
    out_boxes[:, 0::2] = out_boxes[:, 0::2].clamp(0, W)
    out_boxes[:, 1::2] = out_boxes[:, 1::2].clamp(0, H)
    keep = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
    regions, classes, scores, out_boxes = regions[keep], classes[keep], scores[keep], out_boxes[keep]
    # 8. The LVIS API keeps the 300 best of the image.
    order = scores.argsort(descending=True, stable=True)[: cfg.TEST.DETECTIONS_PER_IMAGE]
    regions = regions[order]
    masks800 = (mask_logits[:, 0] > 0)[regions]
    masks = F.interpolate(masks800[:, None].float(), size=(H, W), mode="nearest")[:, 0] > 0.5
    return {"boxes": out_boxes[order], "scores": scores[order], "classes": classes[order], "masks": masks,
            "regions": regions, "probs": probs}


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("antialias", [False, True])
def test_eval_forward_equals_authors_evaluation(photo_file, antialias):
    path, image = photo_file
    cfg = _cfg("MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS", antialias)
    model = _model(cfg)
    boxes, box_scores = _boxes_and_scores(*image.shape[:2])
    inputs, ours = _ours(model, cfg, _dataset_dict(path, image, boxes, box_scores))
    assert tuple(inputs["image"].shape[1:]) == _resize_shortest_edge_shape(*image.shape[:2], 800, 1333) == (800, 1203)
    # Every box of the file is a prompt, unclipped (the duplicate and the outside box included).
    assert len(inputs["proposals"]) == NUM_BOXES
    ref = authors_evaluation(model, cfg, image, boxes, box_scores, antialias=antialias)

    assert len(ours) == len(ref["scores"]) == 300
    assert torch.equal(ours.pred_classes, ref["classes"])
    torch.testing.assert_close(ours.scores, ref["scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pred_boxes.tensor, ref["boxes"], rtol=0, atol=1e-3)
    # The outside box's pairs are gone; the box crossing the edge comes back clipped.
    assert not ((ours.pred_boxes.tensor[:, 0] >= image.shape[1]).any())
    masks = ours.pred_masks
    assert masks.shape == ref["masks"].shape == (300, *image.shape[:2])
    disagree = (masks != ref["masks"]).float().mean().item()
    assert disagree < 1e-4, disagree  # SAM's fast path equals the stock one to ~1e-5 in logits


def test_antialias_changes_the_clip_view(photo_file):
    path, image = photo_file
    boxes, box_scores = _boxes_and_scores(*image.shape[:2])
    record = _dataset_dict(path, image, boxes, box_scores)
    outs = [_ours(_model(_cfg("MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS", a)), _cfg(), record)[1] for a in (False, True)]
    assert not torch.allclose(outs[0].scores, outs[1].scores)


def test_eval_forward_equals_predictor_on_resized_image(photo_file):
    """Same logits and kept detections as the predictor given the 800-scale image and boxes."""
    path, image = photo_file
    cfg = _cfg("MODEL.REGIONSPOT.PROTOCOL.BOX_RESCALE", "fixed", "MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE", "fixed")
    model = _model(cfg)
    head = model.roi_heads
    recorded = []
    logits_fn = head.classifier.forward
    head.classifier.forward = lambda *a, **k: recorded.append(logits_fn(*a, **k)) or recorded[-1]
    boxes, box_scores = _boxes_and_scores(*image.shape[:2])
    inputs, ours = _ours(model, cfg, _dataset_dict(path, image, boxes, box_scores))
    del head.classifier.forward

    # The image and boxes resized the same way, outside the model.
    aug_input = T.AugInput(utils.read_image(path, format="RGB"))
    transforms = build_regionspot_test_mapper(cfg).augmentations(aug_input)
    img800 = aug_input.image
    assert np.array_equal(img800, inputs["image"].permute(1, 2, 0).numpy())
    order = np.argsort(-(np.log(box_scores) - np.log1p(-box_scores)), kind="stable")
    boxes800 = transforms.apply_box(boxes[order])
    torch.testing.assert_close(inputs["proposals"].proposal_boxes.tensor, torch.as_tensor(boxes800, dtype=torch.float32))

    predictor = RegionSpotPredictor(cfg)
    predictor.model.load_state_dict(model.state_dict())
    predictor.set_vocabulary(VOCAB)
    predictor.set_image(img800)
    out = predictor.predict(boxes800, return_masks=False)
    assert len(recorded) == 1
    torch.testing.assert_close(out["logits"], recorded[0], rtol=0, atol=1e-5)

    clipped = torch.as_tensor(boxes800, dtype=torch.float32).clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, img800.shape[1])
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, img800.shape[0])
    valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    regions, classes, scores = select_detections(
        out["scores"], torch.as_tensor(box_scores[order]), "topk_pairs", 900, 300, 0.0, "after_topk", valid
    )
    assert torch.equal(ours.pred_classes, classes)
    torch.testing.assert_close(ours.scores, scores)
    H, W = image.shape[:2]
    expected_boxes = torch.as_tensor(boxes800, dtype=torch.float32)[regions] * torch.tensor(
        [W / img800.shape[1], H / img800.shape[0]] * 2)
    expected_boxes[:, 0::2] = expected_boxes[:, 0::2].clamp(0, W)
    expected_boxes[:, 1::2] = expected_boxes[:, 1::2].clamp(0, H)
    torch.testing.assert_close(ours.pred_boxes.tensor, expected_boxes)


def test_box_score_order_selects_different_pairs():
    """Top-k by probability then times the box score (authors) vs top-k of the product."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(100, 30, generator=g).softmax(dim=1)
    box_scores = torch.rand(100, generator=g)
    a = select_detections(probs, box_scores, "topk_pairs", 900, 300, 0.0, "after_topk")
    b = select_detections(probs, box_scores, "topk_pairs", 900, 300, 0.0, "before_topk")
    # Authors: the kept pairs are among the 900 most probable classes, whatever their box score.
    top900 = set(probs.flatten().topk(900).indices.tolist())
    assert {int(r) * 30 + int(c) for r, c in zip(a[0], a[1])} <= top900
    assert torch.all(a[2][:-1] >= a[2][1:])
    assert {(int(r), int(c)) for r, c in zip(*a[:2])} != {(int(r), int(c)) for r, c in zip(*b[:2])}
    product = probs * box_scores[:, None]
    torch.testing.assert_close(b[2], product.flatten().topk(300).values)


def test_fixed_masks_follow_logits_to_the_original_size(photo_file):
    """MASK_RESIZE fixed: SAM's logits up-sampled to the original size, then thresholded."""
    path, image = photo_file
    boxes, box_scores = _boxes_and_scores(*image.shape[:2])
    record = _dataset_dict(path, image, boxes, box_scores)
    cfg_a = _cfg()
    cfg_f = _cfg("MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE", "fixed")
    a = _ours(_model(cfg_a), cfg_a, record)[1]
    f = _ours(_model(cfg_f), cfg_f, record)[1]
    assert torch.equal(a.pred_classes, f.pred_classes)
    # The same masks up to the boundary pixels the two resizes place differently.
    agree = (a.pred_masks == f.pred_masks).float().mean().item()
    assert 0.9 < agree < 1.0  # random SAM weights: noisy masks with many boundaries


def test_single_resize_keeps_the_original_image(photo_file):
    path, image = photo_file
    boxes, box_scores = _boxes_and_scores(*image.shape[:2])
    cfg = _cfg("INPUT.MIN_SIZE_TEST", 0)
    inputs = build_regionspot_test_mapper(cfg)(_dataset_dict(path, image, boxes, box_scores))
    assert tuple(inputs["image"].shape[1:]) == image.shape[:2]
    order = np.argsort(-(np.log(box_scores) - np.log1p(-box_scores)), kind="stable")
    torch.testing.assert_close(inputs["proposals"].proposal_boxes.tensor, torch.as_tensor(boxes[order]))


def test_detectron2_proposal_handling_clips_and_caps(photo_file):
    path, image = photo_file
    boxes, box_scores = _boxes_and_scores(*image.shape[:2])
    cfg = _cfg("MODEL.REGIONSPOT.PROTOCOL.PROPOSALS", "detectron2", "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", 20)
    props = build_regionspot_test_mapper(cfg)(_dataset_dict(path, image, boxes, box_scores))["proposals"]
    assert len(props) == 20
    h, w = props.image_size
    assert (props.proposal_boxes.tensor[:, 2] <= w).all() and (props.proposal_boxes.tensor[:, 3] <= h).all()


def test_authors_box_rescale_swaps_ratios():
    from regionspot.data.mappers import box_scale_factors

    assert box_scale_factors((300, 451), (800, 1203), "fixed") == (1203 / 451, 800 / 300)
    assert box_scale_factors((300, 451), (800, 1203), "authors") == (800 / 300, 1203 / 451)
    with pytest.raises(ValueError, match="BOX_RESCALE"):
        box_scale_factors((1, 1), (1, 1), "other")
