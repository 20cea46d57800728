"""Several images per frozen-encoder batch give what one image at a time gives."""
import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances

from conftest import tiny_cfg


def _images(photo):
    return [photo, np.ascontiguousarray(photo[20:180, 10:230][:, ::-1])]  # two sizes


def test_encode_images_equals_one_by_one(photo):
    head = build_model(tiny_cfg()).roi_heads
    images = _images(photo)
    states, feats = head.encode_images(images)
    assert feats.shape[0] == 2
    for i, image in enumerate(images):
        state, f = head.encode_image(image)
        assert states[i].input_size == state.input_size and states[i].original_size == state.original_size
        torch.testing.assert_close(states[i].embedding, state.embedding, rtol=0, atol=1e-5)
        torch.testing.assert_close(feats[i : i + 1], f, rtol=0, atol=1e-5)


def test_batched_forward_and_loss_equal_per_image(photo):
    model = build_model(tiny_cfg())
    head = model.roi_heads
    images = _images(photo)
    boxes = [torch.tensor([[5.0, 5.0, 90.0, 120.0], [40.0, 30.0, 150.0, 150.0]]), torch.tensor([[0.0, 0.0, 60.0, 60.0]])]
    tensors = [torch.as_tensor(im).permute(2, 0, 1).float() for im in images]
    batch = ImageList.from_tensors(tensors)
    regions = [Instances(im.shape[:2], proposal_boxes=Boxes(b)) for im, b in zip(images, boxes)]
    model.eval()
    with torch.no_grad():
        batched, _ = head(batch, {}, regions)
        for im, r, out in zip(images, regions, batched):
            alone = head.recognize(im, r)
            torch.testing.assert_close(out.scores, alone.scores, rtol=0, atol=1e-5)
            assert torch.equal(out.pred_classes, alone.pred_classes)
    targets = [Instances(im.shape[:2], gt_boxes=Boxes(b), gt_classes=torch.tensor([1, 2][: len(b)]))
               for im, b in zip(images, boxes)]
    model.train()
    both = head.losses(batch, targets)["loss_region_cls"]
    one_by_one = sum(head.losses(ImageList.from_tensors([t]), [tg])["loss_region_cls"] for t, tg in zip(tensors, targets))
    torch.testing.assert_close(both, one_by_one, rtol=1e-5, atol=1e-5)


def test_mask_second_pass_equals_one_pass(photo):
    """Masks decoded again for the surviving regions only equal the masks kept from one pass."""
    torch.manual_seed(0)
    one = build_model(tiny_cfg("MODEL.REGIONSPOT.MASK.SECOND_PASS_MIN_PROMPTS", 0, "MODEL.REGIONSPOT.SCORE.TOPK", 5)).eval()
    two = build_model(tiny_cfg("MODEL.REGIONSPOT.MASK.SECOND_PASS_MIN_PROMPTS", 1, "MODEL.REGIONSPOT.SCORE.TOPK", 5)).eval()
    two.load_state_dict(one.state_dict())
    rng = np.random.RandomState(0)
    xy = rng.rand(12, 2) * 150
    boxes = torch.as_tensor(np.concatenate([xy, xy + 20 + rng.rand(12, 2) * 60], axis=1), dtype=torch.float32)
    points = torch.as_tensor(rng.rand(12, 1, 2) * 150, dtype=torch.float32)
    for regions in (
        Instances(photo.shape[:2], proposal_boxes=Boxes(boxes)),
        Instances(photo.shape[:2], point_coords=points, point_labels=torch.ones(12, 1, dtype=torch.long)),
    ):
        a, b = one.roi_heads.recognize(photo, regions), two.roi_heads.recognize(photo, regions)
        assert len(a) == 5 and len(b) == 5
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_masks.to_bitmasks(None, *photo.shape[:2]).tensor,
                           b.pred_masks.to_bitmasks(None, *photo.shape[:2]).tensor)
