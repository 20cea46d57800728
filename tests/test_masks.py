"""SamMasks: lazily up-sampled masks equal SAM's own post-processing, per detection."""
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from regionspot.modeling.masks import SamMasks
from regionspot.modeling.sam_tokens import build_sam


def _setup():
    sam = build_sam("tiny", random_init=True)
    g = torch.Generator().manual_seed(0)
    low_res = torch.randn(5, 1, 64, 64, generator=g)
    index = torch.tensor([3, 0, 3, 4, 4, 1])  # detections -> regions, with repeats
    return sam, low_res, index


def test_equals_stock_postprocessing_and_chunking():
    sam, low_res, index = _setup()
    expected = sam.postprocess_masks(low_res, (200, 240), (100, 120))[:, 0] > sam.mask_threshold
    for chunk in (1, 2, 16):
        masks = SamMasks(low_res, index, sam, (200, 240))
        masks.chunk_size = chunk
        assert torch.equal(masks.to_bitmasks(None, 100, 120).tensor, expected[index])
    sub = SamMasks(low_res, index, sam, (200, 240))[torch.tensor([True, False, False, True, False, False])]
    assert len(sub) == 2 and torch.equal(sub.to_bitmasks(None, 100, 120).tensor, expected[[3, 4]])
    assert SamMasks(low_res, index[:0], sam, (200, 240)).to_bitmasks(None, 7, 9).tensor.shape == (0, 7, 9)


def test_detector_postprocess_materialises_at_output_size():
    sam, low_res, index = _setup()
    inst = Instances((200, 240), pred_boxes=Boxes(torch.tensor([[10.0, 10.0, 50.0, 60.0]] * len(index))),
                     scores=torch.ones(len(index)), pred_masks=SamMasks(low_res, index, sam, (200, 240)))
    out = detector_postprocess(inst, 400, 480)
    expected = sam.postprocess_masks(low_res, (200, 240), (400, 480))[:, 0] > sam.mask_threshold
    assert torch.equal(out.pred_masks, expected[index])
