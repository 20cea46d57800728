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
