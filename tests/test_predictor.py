"""RegionSpotPredictor: outputs, vocabulary swaps, input checks, agreement with the eval path."""
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

BOXES = np.array([[10.0, 10.0, 120.0, 150.0], [60.0, 30.0, 230.0, 190.0], [100.0, 100.0, 140.0, 130.0]])


def test_outputs(predictor, photo):
    predictor.set_image(photo)
    out = predictor.predict(BOXES)
    n, c = len(BOXES), len(predictor.class_names)
    assert out["logits"].shape == out["scores"].shape == (n, c)
    assert out["classes"].shape == out["mask_scores"].shape == (n,)
    assert out["masks"].shape == (n, *photo.shape[:2]) and out["masks"].dtype == torch.bool
    torch.testing.assert_close(out["scores"].sum(1), torch.ones(n))
    assert torch.equal(out["classes"], out["logits"].argmax(1))
    torch.testing.assert_close(out["scores"], out["logits"].softmax(1))
    no_masks = predictor.predict(BOXES, return_masks=False)
    assert "masks" not in no_masks
    torch.testing.assert_close(no_masks["logits"], out["logits"], rtol=0, atol=0)


def test_vocabulary_swap_changes_width(predictor, photo):
    original = predictor.class_names
    try:
        predictor.set_vocabulary(["cat", "dog", "astronaut", "flag"])
        predictor.set_image(photo)
        assert predictor.predict(BOXES)["logits"].shape == (3, 4)
        with pytest.raises(ValueError, match="empty"):
            predictor.set_vocabulary([])
    finally:
        predictor.set_vocabulary(original)
    assert predictor.predict(BOXES)["logits"].shape == (3, len(original))


def test_bgr_input_and_input_errors(predictor, photo):
    predictor.set_image(photo)
    rgb = predictor.predict(BOXES)["logits"]
    predictor.set_image(np.ascontiguousarray(photo[:, :, ::-1]), image_format="BGR")
    torch.testing.assert_close(predictor.predict(BOXES)["logits"], rgb, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        predictor.set_image(photo.astype(np.float32))
    with pytest.raises(ValueError, match="boxes must be"):
        predictor.predict(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.zeros((1, 1, 2)))


def test_zero_boxes_and_points(predictor, photo):
    predictor.set_image(photo)
    out = predictor.predict(np.zeros((0, 4)))
    assert out["logits"].shape == (0, len(predictor.class_names)) and out["masks"].shape == (0, *photo.shape[:2])
    pts = predictor.predict(point_coords=np.array([[[50.0, 60.0]], [[150.0, 100.0]]]), point_labels=np.array([[1], [1]]))
    assert pts["logits"].shape == (2, len(predictor.class_names))


def test_predictor_equals_eval_path(predictor, photo):
    """The ROI head's per-region output is the predictor's, region for region."""
    predictor.set_image(photo)
    out = predictor.predict(BOXES)
    regions = Instances(photo.shape[:2], proposal_boxes=Boxes(torch.as_tensor(BOXES, dtype=torch.float32)))
    inst = predictor.head.recognize(photo, regions, per_region=True)
    torch.testing.assert_close(inst.scores, out["scores"].max(1).values, rtol=0, atol=1e-6)
    assert torch.equal(inst.pred_classes, out["classes"])
    assert torch.equal(inst.pred_masks.to_bitmasks(None, *photo.shape[:2]).tensor, out["masks"])


def test_predict_before_set_image(cfg):
    import regionspot

    p = regionspot.RegionSpotPredictor(cfg)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(BOXES)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_frozen_models(photo, precision):
    """Autocast for SAM and CLIP (FROZEN.PRECISION): same outputs up to that precision."""
    import regionspot
    from conftest import tiny_cfg

    torch.manual_seed(0)
    ref = regionspot.RegionSpotPredictor(tiny_cfg())
    torch.manual_seed(0)
    low = regionspot.RegionSpotPredictor(tiny_cfg("MODEL.REGIONSPOT.FROZEN.PRECISION", precision))
    assert low.head.sam.precision == precision and low.head.clip.precision == precision
    ref.set_image(photo)
    low.set_image(photo)
    a, b = ref.predict(BOXES), low.predict(BOXES)
    assert b["logits"].dtype == torch.float32 and b["masks"].dtype == torch.bool
    torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=5e-2)
    assert (a["masks"] != b["masks"]).float().mean() < 0.05


def test_bad_precision(cfg):
    import regionspot

    cfg.MODEL.REGIONSPOT.FROZEN.PRECISION = "int8"
    with pytest.raises(ValueError, match="FROZEN.PRECISION"):
        regionspot.RegionSpotPredictor(cfg)


def test_bf16_runs_copies_and_leaves_the_fp32_models_alone(photo):
    """
    FROZEN.PRECISION bf16 runs SAM's encoder and decoder and CLIP's image tower from bf16 copies
    made once: the fp32 modules (fingerprints, the text tower, SAM's stock predictor) are unchanged,
    the copies are what runs, and switching back to fp32 drops them.
    """
    import regionspot
    from conftest import tiny_cfg
    from regionspot.engine.fingerprints import state_dict_sha256

    torch.manual_seed(0)
    fp32 = regionspot.RegionSpotPredictor(tiny_cfg())
    torch.manual_seed(0)
    low = regionspot.RegionSpotPredictor(tiny_cfg("MODEL.REGIONSPOT.FROZEN.PRECISION", "bf16"))
    sam, clip = low.head.sam, low.head.clip
    assert all(p.dtype == torch.float32 for p in sam.sam.parameters())
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())
    assert state_dict_sha256(sam.sam) == state_dict_sha256(fp32.head.sam.sam)
    assert sam.part("sam.image_encoder").patch_embed.proj.weight.dtype == torch.bfloat16
    assert sam.part("sam.mask_decoder").iou_token.weight.dtype == torch.bfloat16
    assert clip.part("model.visual").conv1.weight.dtype == torch.bfloat16
    # CLIP's LayerNorm normalises in fp32 whatever its input: its copy keeps fp32 weights.
    assert clip.part("model.visual").ln_pre.weight.dtype == torch.float32
    low.set_image(photo)
    out = low.predict(BOXES)
    assert out["logits"].dtype == torch.float32 and torch.isfinite(out["logits"]).all()
    # The text tower is fp32 and shared: the vocabulary's embeddings equal the fp32 model's.
    torch.testing.assert_close(low.head.classifier.text_embeddings, fp32.head.classifier.text_embeddings, rtol=0, atol=0)
    sam.set_precision("fp32")
    assert sam.part("sam.image_encoder") is sam.sam.image_encoder
