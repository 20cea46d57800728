"""
BOX_SOURCE "GENERATOR" with SamAutomaticProposals: SAM's image encoder runs once per image (the
generator's image states go to the head), CLIP's once per image, and the outputs are those of the
former route, where the head encoded every image a second time.
"""
import contextlib

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from segment_anything import SamAutomaticMaskGenerator
from skimage import data

from conftest import tiny_cfg
from regionspot.modeling import RegionSpot, SamAutomaticProposals
from regionspot.modeling.meta_arch import rescale_results
from regionspot.modeling.proposal_generators import amg_masks_to_proposals

# A coarse grid, no quality filter and a loose NMS, so the tiny random SAM returns several proposals.
AMG_OPTS = (
    "MODEL.REGIONSPOT.BOX_SOURCE", "GENERATOR",
    "MODEL.PROPOSAL_GENERATOR.NAME", "SamAutomaticProposals",
    "MODEL.REGIONSPOT.AMG.POINTS_PER_SIDE", 4,
    "MODEL.REGIONSPOT.AMG.PRED_IOU_THRESH", 0.0,
    "MODEL.REGIONSPOT.AMG.STABILITY_SCORE_THRESH", 0.0,
    "MODEL.REGIONSPOT.AMG.BOX_NMS_THRESH", 0.95,
)


def generator_cfg(*opts):
    return tiny_cfg(*AMG_OPTS, *opts)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(generator_cfg()).eval()
    assert isinstance(m, RegionSpot) and isinstance(m.proposal_generator, SamAutomaticProposals)
    return m


@pytest.fixture(scope="module")
def images():
    # Two sizes, so the batch is padded and each image keeps its own SAM input size.
    astronaut = np.ascontiguousarray(data.astronaut()[80:280, 100:340])
    coffee = np.ascontiguousarray(data.coffee()[::3, ::3])
    return [astronaut, coffee]


def batched_inputs(images):
    return [
        {"image": torch.as_tensor(im).permute(2, 0, 1).contiguous(), "height": im.shape[0], "width": im.shape[1]}
        for im in images
    ]


@contextlib.contextmanager
def count_batch_sizes(module):
    """Record the batch size of every ``module.forward`` call (the number of images it encodes)."""
    sizes = []
    forward = module.forward

    def counting(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return forward(x, *args, **kwargs)

    module.forward = counting
    try:
        yield sizes
    finally:
        del module.forward  # the class's forward again


@contextlib.contextmanager
def count_encoders(model):
    """Images through SAM's image encoder and through CLIP's visual tower (its patch embedding)."""
    with count_batch_sizes(model.roi_heads.sam.sam.image_encoder) as sam, count_batch_sizes(
        model.roi_heads.clip.model.visual.conv1
    ) as clip:
        yield sam, clip


def two_encodings(model, monkeypatch):
    """The former route: the head encodes the generator's images again (no states handed over)."""
    monkeypatch.setattr(model, "_generated_regions", lambda ims: (model.proposal_generator(ims, {}, None)[0], None))


def assert_same_outputs(outputs, reference):
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        a, b = out["instances"], ref["instances"]
        assert a.image_size == b.image_size and len(a) == len(b) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.mask_scores, b.mask_scores)
        assert a.pred_masks.dtype == torch.bool and torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("num_images", [1, 2])
def test_one_sam_encoding_per_image_same_outputs(model, images, num_images, monkeypatch):
    inputs = batched_inputs(images[:num_images])
    with count_encoders(model) as (sam, clip):
        outputs = model.inference(inputs)
    # One encoder call for the batch, each image in it once; CLIP still runs once per image.
    assert sam == [num_images] and sum(clip) == num_images

    with monkeypatch.context() as m:
        two_encodings(model, m)
        with count_encoders(model) as (sam, clip):
            reference = model.inference(inputs)
    assert sum(sam) == 2 * num_images and sum(clip) == num_images  # the counter sees both encodings
    assert_same_outputs(outputs, reference)


@pytest.mark.parametrize("num_images", [1, 2])
def test_states_are_the_heads_own_encoding(model, images, num_images):
    """The generator encodes the pixels the head reads, with the head's call: the head's exact states."""
    ims = model.preprocess_image(batched_inputs(images[:num_images]))
    proposals, states = model.proposal_generator.propose_with_image_states(ims)
    assert len(proposals) == len(states) == num_images
    assert all(len(p) > 1 for p in proposals)  # the comparisons of the other tests are not trivial
    rgbs = model.roi_heads.rgb_images(ims)
    head_states, _ = model.roi_heads.encode_images(rgbs)
    for state, head_state, rgb in zip(states, head_states, rgbs):
        assert state.original_size == head_state.original_size == tuple(rgb.shape[-2:])
        assert state.input_size == head_state.input_size
        assert torch.equal(state.embedding, head_state.embedding)


def test_same_outputs_as_the_stock_generator_and_head(model, images):
    """One image: the stock SamAutomaticMaskGenerator (encoding on its own) then the head (encoding again)."""
    image = images[0]
    amg = generator_cfg().MODEL.REGIONSPOT.AMG
    stock = SamAutomaticMaskGenerator(
        model.roi_heads.sam.sam, points_per_side=amg.POINTS_PER_SIDE, points_per_batch=amg.POINTS_PER_BATCH,
        pred_iou_thresh=amg.PRED_IOU_THRESH, stability_score_thresh=amg.STABILITY_SCORE_THRESH,
        box_nms_thresh=amg.BOX_NMS_THRESH,
    )
    proposals = amg_masks_to_proposals(stock.generate(image), image.shape[:2], amg.MAX_PROPOSALS)
    inputs = batched_inputs([image])
    (result,), _ = model.roi_heads(model.preprocess_image(inputs), {}, [proposals], None)
    reference = [{"instances": rescale_results(result, *image.shape[:2], drop_empty=True)}]
    assert_same_outputs(model.inference(inputs), reference)


def test_head_refuses_states_of_other_images(model, images):
    ims = model.preprocess_image(batched_inputs(images))
    proposals, states = model.proposal_generator.propose_with_image_states(ims)
    with pytest.raises(ValueError, match="2 images but 1 sam_states"):
        model.roi_heads(ims, {}, proposals, None, sam_states=states[:1])
    with pytest.raises(ValueError, match=r"sam_states\[0\] was encoded from a \(134, 200\) image"):
        model.roi_heads(ims, {}, proposals, None, sam_states=states[::-1])


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_generator_and_head_read_the_mappers_pixels(images, input_format):
    """
    One pixel path: the batch the generator and the head read is the mapper's uint8 image as RGB,
    never normalised (so MODEL.PIXEL_MEAN / PIXEL_STD play no part), and a float copy of the same
    image gives the same pixels.
    """
    cfg = generator_cfg("INPUT.FORMAT", input_format, "MODEL.PIXEL_MEAN", [10.0, 20.0, 30.0],
                        "MODEL.PIXEL_STD", [2.0, 3.0, 4.0])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = batched_inputs([np.ascontiguousarray(im[:, :, ::-1]) if input_format == "BGR" else im for im in images])
    ims = model.preprocess_image(inputs)
    assert ims.tensor.dtype == torch.uint8
    for rgb, image in zip(model.roi_heads.rgb_images(ims), images):
        assert torch.equal(rgb, torch.as_tensor(image).permute(2, 0, 1))
    floats = [dict(x, image=x["image"].float()) for x in inputs]
    assert torch.equal(model.preprocess_image(floats).tensor, ims.tensor)


def test_default_predictor_encodes_once(images):
    cfg = generator_cfg("INPUT.MIN_SIZE_TEST", 256)
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    image = images[0]
    with count_encoders(predictor.model) as (sam, clip):
        out = predictor(np.ascontiguousarray(image[:, :, ::-1]))  # DefaultPredictor takes BGR
    assert sam == [1] and clip == [1]
    inst = out["instances"]
    assert inst.image_size == image.shape[:2]
    assert len(inst) > 0 and inst.has("pred_classes") and inst.has("scores") and inst.has("pred_masks")
