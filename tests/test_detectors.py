"""
RegionSpot behind detectron2 detectors and proposal sources (CPU, random-weight R50-FPN, tiny SAM/CLIP):
GeneralizedRCNN + RegionSpotROIHeads (RPN proposals as prompts), RegionSpotRelabel (a frozen
detector's boxes re-labelled), given boxes, empty proposal sets, SAM's automatic mask generator as
proposal generator, point prompts, loading RegionSpot weights into a detector.
"""
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.proposal_generator import RPN, build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances
from segment_anything import SamAutomaticMaskGenerator
from skimage import data
from torch import nn

import regionspot
from conftest import REPO_ROOT, tiny_cfg
from regionspot.modeling import RegionSpot, RegionSpotROIHeads, RegionSpotRelabel, SamAutomaticProposals, load_head_weights
from regionspot.modeling.proposal_generators import amg_masks_to_proposals

PROJECT = os.path.join(REPO_ROOT, "projects", "RegionSpot", "configs")


def project_cfg(name, cache_dir, *opts):
    cfg = get_cfg()
    regionspot.add_regionspot_config(cfg)
    cfg.merge_from_file(os.path.join(PROJECT, name))
    cfg.merge_from_list(["MODEL.REGIONSPOT.VOCAB.CACHE_DIR", str(cache_dir), *opts])
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)  # the random detector's boxes are then the same on every run
    return build_model(cfg).eval()


def to_chw(image_hwc: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()  # 512 x 512 RGB


@pytest.fixture(scope="module")
def coffee():
    return data.coffee()  # 400 x 600 RGB


@pytest.fixture(scope="module")
def rcnn(cache_dir):
    return build(project_cfg("RPN-Proposals/RegionSpot-tiny_rpn-proposals_shapes.yaml", cache_dir))


@pytest.fixture(scope="module")
def relabel(cache_dir):
    return build(project_cfg("Detector-Relabel/RegionSpot-tiny_relabel-mask-rcnn_shapes.yaml", cache_dir))


@pytest.fixture(scope="module")
def regionspot_model(cache_dir):
    return build(tiny_cfg("MODEL.REGIONSPOT.VOCAB.CACHE_DIR", str(cache_dir)))


def rcnn_input(cfg, image_rgb):
    """What detectron2's test mapper gives a BGR detector: the resized image, the original size."""
    bgr = image_rgb[:, :, ::-1]
    resized = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(bgr).apply_image(bgr)
    return {"image": to_chw(resized), "height": image_rgb.shape[0], "width": image_rgb.shape[1]}, resized


def check_instances(inst: Instances, size, num_classes, max_len=None, masks=True):
    assert inst.image_size == tuple(size)
    n = len(inst)
    assert inst.pred_boxes.tensor.shape == (n, 4) and torch.isfinite(inst.pred_boxes.tensor).all()
    b = inst.pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= size[1]).all() and (b[:, 3] <= size[0]).all()
    assert inst.scores.shape == (n,) and ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert inst.pred_classes.shape == (n,) and inst.pred_classes.dtype == torch.int64
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()
    if masks:
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape == (n, *size)
    if max_len is not None:
        assert n <= max_len


def empty_proposals(images):
    out = []
    for size in images.image_sizes:
        p = Instances(tuple(size))
        p.proposal_boxes = Boxes(torch.zeros(0, 4))
        p.objectness_logits = torch.zeros(0)
        out.append(p)
    return out


# -----------------------------------------------------------------------------------------------
# GeneralizedRCNN (R50-FPN + RPN) with RegionSpotROIHeads
def test_generalized_rcnn_rpn_proposals(rcnn, astronaut):
    assert type(rcnn) is GeneralizedRCNN and isinstance(rcnn.proposal_generator, RPN)
    assert isinstance(rcnn.roi_heads, RegionSpotROIHeads)
    cfg = project_cfg("RPN-Proposals/RegionSpot-tiny_rpn-proposals_shapes.yaml", "unused")
    inp, resized = rcnn_input(cfg, astronaut)
    assert min(resized.shape[:2]) == 200

    # The head sees the un-normalised RGB pixels of the (padded) detector batch, cropped to the image.
    images = rcnn.preprocess_image([inp])
    assert images.tensor.shape[-1] % 32 == 0 and images.tensor.shape[-2] % 32 == 0
    h, w = images.image_sizes[0]
    (rgb,) = rcnn.roi_heads.rgb_images(images)
    np.testing.assert_array_equal(rgb.permute(1, 2, 0).numpy(), resized[:, :, ::-1])

    with torch.no_grad():
        proposals, _ = rcnn.proposal_generator(images, rcnn.backbone(images.tensor), None)
        (out,) = rcnn([inp])
    assert 0 < len(proposals[0]) <= cfg.MODEL.RPN.POST_NMS_TOPK_TEST
    inst = out["instances"]
    # detector_postprocess: boxes and SAM masks at the requested (original) size.
    check_instances(inst, astronaut.shape[:2], rcnn.roi_heads.num_classes, cfg.TEST.DETECTIONS_PER_IMAGE)
    assert len(inst) > 0
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    # Every result is an RPN box, scaled from the 200 px input to 512 px.
    rpn_boxes = proposals[0].proposal_boxes.tensor * (512 / 200)
    d = (inst.pred_boxes.tensor[:, None] - rpn_boxes[None]).abs().amax(-1)
    assert (d.amin(1) < 1e-2).all()


def test_generalized_rcnn_given_boxes_name_the_way(rcnn, astronaut):
    """detectron2's forward_with_given_boxes(features, ...) cannot reach the pixels: a clear error names the way."""
    cfg = project_cfg("RPN-Proposals/RegionSpot-tiny_rpn-proposals_shapes.yaml", "unused")
    inp, _ = rcnn_input(cfg, astronaut)
    given = Instances((inp["height"], inp["width"]))
    given.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 100.0, 120.0]]))
    with pytest.raises(NotImplementedError, match="classify_given_boxes"):
        rcnn.inference([inp], detected_instances=[given])


def test_generalized_rcnn_box_scores_multiply(rcnn, astronaut, monkeypatch):
    """USE_BOX_SCORES: class probability x sigmoid(objectness_logits) of the RPN box."""
    cfg = project_cfg("RPN-Proposals/RegionSpot-tiny_rpn-proposals_shapes.yaml", "unused")
    inp, _ = rcnn_input(cfg, astronaut)
    boxes = torch.tensor([[10.0, 10.0, 120.0, 150.0], [60.0, 30.0, 190.0, 190.0], [100.0, 100.0, 140.0, 130.0]])

    def fixed(images, features, gt_instances=None):
        p = Instances(tuple(images.image_sizes[0]))
        p.proposal_boxes = Boxes(boxes.clone())
        p.objectness_logits = torch.zeros(3)  # box score 0.5
        return [p], {}

    monkeypatch.setattr(rcnn.proposal_generator, "forward", fixed)
    head = rcnn.roi_heads
    with torch.no_grad():
        fused = rcnn([inp])[0]["instances"]
        monkeypatch.setattr(head, "use_box_scores", False)
        plain = rcnn([inp])[0]["instances"]
    assert len(fused) == len(plain) == 3 * head.num_classes
    torch.testing.assert_close(fused.scores, 0.5 * plain.scores)
    assert torch.equal(fused.pred_classes, plain.pred_classes)


def test_generalized_rcnn_empty_rpn(rcnn, astronaut, monkeypatch):
    cfg = project_cfg("RPN-Proposals/RegionSpot-tiny_rpn-proposals_shapes.yaml", "unused")
    inp, _ = rcnn_input(cfg, astronaut)
    monkeypatch.setattr(rcnn.proposal_generator, "forward", lambda images, features, gt=None: (empty_proposals(images), {}))
    with torch.no_grad():
        (out,) = rcnn([inp])
    inst = out["instances"]
    assert len(inst) == 0
    check_instances(inst, astronaut.shape[:2], rcnn.roi_heads.num_classes)


def test_regionspot_weights_into_generalized_rcnn(rcnn, regionspot_model, tmp_path):
    """MODEL.WEIGHTS is the detector's; the fusion module comes from a RegionSpot checkpoint."""
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(regionspot_model, str(tmp_path)).save("regionspot")
    path = str(tmp_path / "regionspot.pth")
    before = {k: v.clone() for k, v in rcnn.roi_heads.fusion.state_dict().items()}
    backbone = {k: v.clone() for k, v in rcnn.backbone.state_dict().items()}
    try:
        loaded = load_head_weights(rcnn, path)
        want = regionspot_model.roi_heads.fusion.state_dict()
        assert sorted(loaded) == sorted(want)
        for k, v in rcnn.roi_heads.fusion.state_dict().items():
            assert torch.equal(v, want[k])
        for k, v in rcnn.backbone.state_dict().items():
            assert torch.equal(v, backbone[k])  # nothing else touched

        # The authors' released layout (model.to_clip.* ...) loads too.
        released = {"model": {"model." + k: v for k, v in want.items()}}
        released["model"]["model.sam.image_encoder.pos_embed"] = torch.zeros(1)
        torch.save(released, tmp_path / "released.pth")
        rcnn.roi_heads.fusion.load_state_dict(before)
        load_head_weights(rcnn, str(tmp_path / "released.pth"))
        for k, v in rcnn.roi_heads.fusion.state_dict().items():
            assert torch.equal(v, want[k])

        torch.save({"model": {"backbone.x": torch.zeros(1)}}, tmp_path / "detector.pth")
        with pytest.raises(ValueError, match="no RegionSpot fusion weights"):
            load_head_weights(rcnn, str(tmp_path / "detector.pth"))
        with pytest.raises(FileNotFoundError, match="HEAD.WEIGHTS"):
            load_head_weights(rcnn, str(tmp_path / "missing.pth"))
    finally:
        rcnn.roi_heads.fusion.load_state_dict(before)


# -----------------------------------------------------------------------------------------------
# RegionSpotRelabel: a frozen detector's boxes re-labelled
class StubDetector(nn.Module):
    """A 'detector' returning fixed boxes (in the requested height/width frame); records its input."""

    def __init__(self, boxes, scores=None, key="instances"):
        super().__init__()
        self.boxes, self.scores, self.key = boxes, scores, key
        self.conv = nn.Conv2d(3, 1, 1)  # a parameter to freeze
        self.seen = []

    def forward(self, batched_inputs):
        assert not self.training
        (x,) = batched_inputs
        self.seen.append(x)
        inst = Instances((x["height"], x["width"]))
        if self.key == "instances":
            inst.pred_boxes = Boxes(self.boxes.clone())
            inst.scores = self.scores.clone()
            inst.pred_classes = torch.zeros(len(self.boxes), dtype=torch.long)
        else:
            inst.proposal_boxes = Boxes(self.boxes.clone())
            inst.objectness_logits = self.scores.clone()
        return [{self.key: inst}]


STUB_BOXES = torch.tensor([[300.0, 50.0, 560.0, 390.0], [20.0, 100.0, 200.0, 300.0], [0.0, 0.0, 600.0, 400.0], [250.0, 200.0, 260.0, 210.0]])
STUB_SCORES = torch.tensor([0.9, 0.8, 0.3, 0.05])


def stub_relabel(cache_dir, detector, per_region=True, use_box_scores=True):
    cfg = tiny_cfg("MODEL.REGIONSPOT.VOCAB.CACHE_DIR", str(cache_dir))
    torch.manual_seed(0)
    return RegionSpotRelabel(
        detector=detector,
        roi_heads=build_roi_heads(cfg, {}),
        input_format="RGB",
        detector_input_format="BGR",
        detector_min_size=100,
        detector_max_size=1000,
        per_region=per_region,
        use_box_scores=use_box_scores,
    ).eval()


def test_relabel_given_detector_keeps_boxes_in_order(cache_dir, coffee):
    detector = StubDetector(STUB_BOXES, STUB_SCORES)
    model = stub_relabel(cache_dir, detector)
    inputs = [{"image": to_chw(coffee), "height": 400, "width": 600}]
    (out,) = model(inputs)
    inst = out["instances"]
    check_instances(inst, (400, 600), model.roi_heads.num_classes)
    # per_region: one result per detector box, in the detector's order.
    torch.testing.assert_close(inst.pred_boxes.tensor, STUB_BOXES)
    # The detector read its own format (BGR) at its own size (shortest edge 100), and was asked for
    # boxes at the input's size.
    (seen,) = detector.seen
    bgr = coffee[:, :, ::-1]
    expected = T.ResizeShortestEdge([100, 100], 1000).get_transform(bgr).apply_image(bgr)
    assert seen["image"].shape == (3, 100, 150)
    np.testing.assert_array_equal(seen["image"].numpy(), expected.transpose(2, 0, 1))
    assert (seen["height"], seen["width"]) == (400, 600)

    # Scores: best class probability x detector score; the same boxes given directly agree.
    given = Instances((400, 600))
    given.pred_boxes = Boxes(STUB_BOXES.clone())
    (direct,) = model.inference(inputs, detected_instances=[given])
    d = direct["instances"]
    torch.testing.assert_close(d.pred_boxes.tensor, STUB_BOXES)
    assert torch.equal(d.pred_classes, inst.pred_classes)
    torch.testing.assert_close(inst.scores, d.scores * STUB_SCORES)
    assert len(detector.seen) == 1  # detected_instances skip the detector

    # The detector's order is kept even when the output is rescaled.
    (half,) = model([{"image": to_chw(coffee), "height": 200, "width": 300}])
    torch.testing.assert_close(half["instances"].pred_boxes.tensor, STUB_BOXES / 2)
    assert half["instances"].pred_masks.shape == (4, 200, 300)


def test_relabel_topk_pairs_and_proposal_networks(cache_dir, coffee):
    inputs = [{"image": to_chw(coffee), "height": 400, "width": 600}]
    model = stub_relabel(cache_dir, StubDetector(STUB_BOXES, STUB_SCORES), per_region=False)
    inst = model(inputs)[0]["instances"]
    c = model.roi_heads.num_classes
    check_instances(inst, (400, 600), c)
    assert len(inst) == len(STUB_BOXES) * c  # every (box, class) pair: SCORE.TOPK 100 > 4 x 6
    d = (inst.pred_boxes.tensor[:, None] - STUB_BOXES[None]).abs().amax(-1)
    assert (d.amin(1) < 1e-4).all()
    # Scores are multiplied by the detector score: no pair of the 0.05 box beats 0.05.
    of_last = d.argmin(1) == 3
    assert (inst.scores[of_last] <= 0.05 + 1e-6).all()

    # A proposal network ("proposals" with objectness logits) works as well.
    logits = torch.tensor([2.0, 1.0, 0.0, -3.0])
    model = stub_relabel(cache_dir, StubDetector(STUB_BOXES, logits, key="proposals"))
    inst = model(inputs)[0]["instances"]
    torch.testing.assert_close(inst.pred_boxes.tensor, STUB_BOXES)
    plain = stub_relabel(cache_dir, StubDetector(STUB_BOXES, logits, key="proposals"), use_box_scores=False)
    torch.testing.assert_close(inst.scores, plain(inputs)[0]["instances"].scores * logits.sigmoid())


def test_relabel_empty_detections(cache_dir, coffee):
    model = stub_relabel(cache_dir, StubDetector(torch.zeros(0, 4), torch.zeros(0)))
    for per_region in (True, False):
        model.per_region = per_region
        (out,) = model([{"image": to_chw(coffee), "height": 400, "width": 600}])
        assert len(out["instances"]) == 0
        check_instances(out["instances"], (400, 600), model.roi_heads.num_classes)


def test_relabel_detector_is_frozen_and_not_saved(cache_dir):
    detector = StubDetector(STUB_BOXES, STUB_SCORES)
    model = stub_relabel(cache_dir, detector)
    model.train()
    assert not detector.training and model.roi_heads.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("roi_heads.fusion.") for n in trainable)
    state = model.state_dict()
    assert not any(k.startswith("detector.") for k in state)
    incompatible = model.load_state_dict(state, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    model.eval()


def test_relabel_mask_rcnn_from_config(relabel, astronaut, cache_dir):
    """The recipe's detector: a stock (random-weight) Mask R-CNN R50-FPN from detectron2's model zoo."""
    assert isinstance(relabel.detector, GeneralizedRCNN) and not relabel.detector.training
    assert not any(p.requires_grad for p in relabel.detector.parameters())
    assert relabel.detector_input_format == "BGR"
    image = astronaut[::2, ::2]  # 256 px; the detector reads it at 160 px (DETECTOR.OPTS)
    regions = relabel.detect(to_chw(image))
    assert regions.image_size == (256, 256) and 0 < len(regions) <= 12
    (out,) = relabel([{"image": to_chw(image), "height": 512, "width": 512}])
    inst = out["instances"]
    check_instances(inst, (512, 512), relabel.roi_heads.num_classes)
    assert len(inst) > 0
    d = (inst.pred_boxes.tensor[:, None] - 2 * regions.proposal_boxes.tensor[None]).abs().amax(-1)
    assert (d.amin(1) < 1e-3).all()  # every result is a detector box

    per_region = build(project_cfg("Detector-Relabel/RegionSpot-tiny_relabel-mask-rcnn_shapes.yaml", cache_dir,
                                   "MODEL.REGIONSPOT.SCORE.MODE", "per_region"))
    regions = per_region.detect(to_chw(image))
    inst = per_region([{"image": to_chw(image)}])[0]["instances"]
    torch.testing.assert_close(inst.pred_boxes.tensor, regions.proposal_boxes.tensor)


# -----------------------------------------------------------------------------------------------
# The RegionSpot meta-architecture: given boxes and empty GT
def test_given_boxes_one_result_each_in_order(regionspot_model, coffee):
    inputs = [{"image": to_chw(coffee), "height": 200, "width": 300}]
    given = Instances((400, 600))
    order = torch.tensor([2, 0, 3, 1])
    given.pred_boxes = Boxes(STUB_BOXES[order].clone())
    (out,) = regionspot_model.inference(inputs, detected_instances=[given])
    inst = out["instances"]
    check_instances(inst, (200, 300), regionspot_model.roi_heads.num_classes)
    torch.testing.assert_close(inst.pred_boxes.tensor, STUB_BOXES[order] / 2)

    images = regionspot_model.preprocess_image(inputs)
    (raw,) = regionspot_model.roi_heads.classify_given_boxes(images, [given])
    assert len(raw) == 4 and raw.image_size == (400, 600)
    torch.testing.assert_close(raw.pred_boxes.tensor, STUB_BOXES[order])
    torch.testing.assert_close(raw.scores, inst.scores)


def test_regionspot_no_gt_boxes(regionspot_model, coffee):
    gt = Instances((400, 600))
    gt.gt_boxes = Boxes(torch.zeros(0, 4))
    gt.gt_classes = torch.zeros(0, dtype=torch.long)
    (out,) = regionspot_model([{"image": to_chw(coffee), "instances": gt, "height": 400, "width": 600}])
    assert len(out["instances"]) == 0
    check_instances(out["instances"], (400, 600), regionspot_model.roi_heads.num_classes)
    given = Instances((400, 600))
    given.pred_boxes = Boxes(torch.zeros(0, 4))
    (out,) = regionspot_model.inference([{"image": to_chw(coffee)}], detected_instances=[given])
    assert len(out["instances"]) == 0


# -----------------------------------------------------------------------------------------------
# Point prompts through the head
def test_point_prompts_through_head(regionspot_model, coffee):
    head = regionspot_model.roi_heads
    points = torch.tensor([[[430.0, 220.0]], [[100.0, 200.0]], [[300.0, 390.0]]])
    labels = torch.ones(3, 1, dtype=torch.long)
    regions = Instances((400, 600))
    regions.point_coords, regions.point_labels = points, labels
    out = head.recognize(coffee, regions, per_region=True)
    check_instances(out, (400, 600), head.num_classes, masks=False)
    assert len(out) == 3
    masks = out.pred_masks.to_bitmasks(None, 400, 600)
    # Point prompts only: the boxes are those of the predicted masks.
    torch.testing.assert_close(out.pred_boxes.tensor, masks.get_bounding_boxes().tensor)

    # The same through the ROI-head contract (top-k scoring), and with boxes plus clicks.
    images = ImageList.from_tensors([to_chw(coffee).float()])
    results, _ = head(images, {}, [regions], None)
    assert len(results[0]) == 3 * head.num_classes
    both = Instances((400, 600))
    both.proposal_boxes = Boxes(STUB_BOXES[:3].clone())
    both.point_coords, both.point_labels = points, labels
    with_boxes = head.recognize(coffee, both, per_region=True)
    torch.testing.assert_close(with_boxes.pred_boxes.tensor, STUB_BOXES[:3])
    assert not torch.equal(with_boxes.mask_scores, out.mask_scores)  # the boxes change SAM's answer


# -----------------------------------------------------------------------------------------------
# SAM's automatic mask generator as proposal generator
def test_sam_automatic_proposals(cache_dir, astronaut):
    cfg = project_cfg("SAM-Proposals/RegionSpot-tiny_sam-proposals_shapes.yaml", cache_dir)
    generator = build_proposal_generator(cfg, None)
    assert isinstance(generator, SamAutomaticProposals) and generator.sam is None  # built when first needed
    image = astronaut[::2, ::2]
    images = ImageList.from_tensors([to_chw(image).float()])
    (props,), losses = generator(images, {}, None)
    assert losses == {} and props.image_size == (256, 256)
    n = len(props)
    assert 0 < n <= cfg.MODEL.REGIONSPOT.AMG.MAX_PROPOSALS
    b = props.proposal_boxes.tensor
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all() and (b >= 0).all() and (b <= 256).all()
    assert torch.isfinite(props.objectness_logits).all()
    assert (props.objectness_logits[:-1] >= props.objectness_logits[1:]).all()
    assert not any(p.requires_grad for p in generator.sam.parameters())
    assert not any(k.startswith("sam.") for k in generator.state_dict())

    # The stock generator on the same SAM, same settings: the same boxes (XYWH -> XYXY) and IoUs.
    amg = cfg.MODEL.REGIONSPOT.AMG
    records = SamAutomaticMaskGenerator(
        generator.sam, points_per_side=amg.POINTS_PER_SIDE, points_per_batch=amg.POINTS_PER_BATCH,
        pred_iou_thresh=amg.PRED_IOU_THRESH, stability_score_thresh=amg.STABILITY_SCORE_THRESH,
        box_nms_thresh=amg.BOX_NMS_THRESH,
    ).generate(image)
    records = sorted(records, key=lambda r: -r["predicted_iou"])[: amg.MAX_PROPOSALS]
    xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float32)
    torch.testing.assert_close(b, torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
    iou = torch.tensor([r["predicted_iou"] for r in records]).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(props.objectness_logits.sigmoid(), iou)

    # Its SAM is the head's SAM (seeded the same way) when built from the same config.
    head = build_roi_heads(tiny_cfg("MODEL.REGIONSPOT.VOCAB.CACHE_DIR", str(cache_dir)), {})
    for (k, v), (k2, v2) in zip(generator.sam.state_dict().items(), head.sam.sam.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_amg_records_to_proposals():
    records = [
        {"bbox": [10, 20, 30, 40], "predicted_iou": 0.5},
        {"bbox": [0, 0, 5, 5], "predicted_iou": 1.02},  # SAM's IoU head is not bounded
        {"bbox": [50, 50, 10, 10], "predicted_iou": 0.9},
    ]
    p = amg_masks_to_proposals(records, (100, 120), max_proposals=2)
    assert p.image_size == (100, 120) and len(p) == 2
    torch.testing.assert_close(p.proposal_boxes.tensor, torch.tensor([[0.0, 0.0, 5.0, 5.0], [50.0, 50.0, 60.0, 60.0]]))
    torch.testing.assert_close(p.objectness_logits.sigmoid(), torch.tensor([1 - 1e-6, 0.9]))
    assert len(amg_masks_to_proposals(records, (100, 120), max_proposals=0)) == 3
    empty = amg_masks_to_proposals([], (100, 120), max_proposals=5)
    assert len(empty) == 0 and empty.proposal_boxes.tensor.shape == (0, 4)


def test_regionspot_with_sam_proposals(cache_dir, astronaut):
    """BOX_SOURCE 'GENERATOR': the RegionSpot meta-architecture prompts with SAM's automatic proposals."""
    model = build(project_cfg("SAM-Proposals/RegionSpot-tiny_sam-proposals_shapes.yaml", cache_dir))
    assert isinstance(model, RegionSpot) and isinstance(model.proposal_generator, SamAutomaticProposals)
    assert model.proposal_generator.sam is model.roi_heads.sam.sam  # one SAM
    assert not any(".sam." in k or k.startswith("proposal_generator.") for k in model.state_dict())
    image = astronaut[::2, ::2]
    images = model.preprocess_image([{"image": to_chw(image)}])
    proposals, _ = model.proposal_generator(images, {}, None)
    (out,) = model([{"image": to_chw(image), "height": 512, "width": 512}])
    inst = out["instances"]
    check_instances(inst, (512, 512), model.roi_heads.num_classes)
    assert len(inst) > 0
    d = (inst.pred_boxes.tensor[:, None] - 2 * proposals[0].proposal_boxes.tensor[None]).abs().amax(-1)
    assert (d.amin(1) < 1e-3).all()
