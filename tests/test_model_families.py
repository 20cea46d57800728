"""Localizers (SAM 2.1, HQ-SAM) and vision-language models (OpenCLIP, EVA02-CLIP) behind the same head."""
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.modeling import RegionSpotROIHeads, build_localizer, build_vlm
from regionspot.modeling.localizers import HQSamRegionTokens, Sam2RegionTokens, build_hq_sam, build_sam2_model
from regionspot.modeling.model_registry import LOCALIZER_REGISTRY, VLM_REGISTRY
from regionspot.modeling.open_clip_features import (
    TINY_EVA02_CLIP,
    TINY_OPEN_CLIP,
    OpenClipDenseFeatures,
    TokenizerFilesMissing,
    build_open_clip,
    open_clip_tokenizer,
)
from regionspot.modeling.weights import WeightsFileError

from conftest import tiny_cfg

BOXES = np.array([[10.0, 12.0, 70.0, 60.0], [0.0, 0.0, 119.0, 89.0], [40.5, 20.25, 90.0, 85.0]])

SAM2 = ("MODEL.REGIONSPOT.LOCALIZER.NAME", "Sam2RegionTokens", "MODEL.REGIONSPOT.LOCALIZER.TYPE", "tiny")
HQ = ("MODEL.REGIONSPOT.LOCALIZER.NAME", "HQSamRegionTokens", "MODEL.REGIONSPOT.LOCALIZER.TYPE", "tiny")
OPENCLIP = ("MODEL.REGIONSPOT.VLM.NAME", "OpenClipDenseFeatures", "MODEL.REGIONSPOT.VLM.TYPE", TINY_OPEN_CLIP)


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(0).rand(90, 120, 3) * 255).astype(np.uint8)


def test_registries_hold_every_family():
    assert {"SamRegionTokens", "Sam2RegionTokens", "HQSamRegionTokens"} <= {n for n, _ in LOCALIZER_REGISTRY}
    assert {"ClipDenseFeatures", "OpenClipDenseFeatures"} <= {n for n, _ in VLM_REGISTRY}


def test_config_selects_the_pair_and_defaults_stay():
    cfg = tiny_cfg()
    assert cfg.MODEL.REGIONSPOT.LOCALIZER.NAME == "SamRegionTokens"
    assert cfg.MODEL.REGIONSPOT.VLM.NAME == "ClipDenseFeatures"
    sam2 = build_localizer(tiny_cfg(*SAM2))
    assert isinstance(sam2, Sam2RegionTokens) and sam2.model_name == "tiny" and sam2.token_dim == 32
    vlm = build_vlm(tiny_cfg(*OPENCLIP))
    assert isinstance(vlm, OpenClipDenseFeatures) and (vlm.width, vlm.embed_dim) == (64, 32)
    # frozen: no autograd, eval mode whatever the trainer asks
    for m in (sam2, vlm):
        m.train()
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="LOCALIZER.NAME='Nope' is not registered"):
        build_localizer(tiny_cfg("MODEL.REGIONSPOT.LOCALIZER.NAME", "Nope"))


def test_sam2_tokens_equal_the_package(image):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_sam2_model("tiny", random_init=True, seed=3)
    adapter = Sam2RegionTokens(model)
    out = adapter.decode_prompts(adapter.encode_image(image), torch.as_tensor(BOXES))
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
    predictor.set_image(image)
    _, iou, low_res = predictor.predict(box=BOXES, multimask_output=False, return_logits=True)
    np.testing.assert_allclose(out.low_res_masks.numpy(), low_res, atol=1e-5)
    np.testing.assert_allclose(out.mask_scores.numpy(), iou[:, 0], atol=1e-6)
    # The token: what the package's own mask decoder returns for these prompts (mask token 0).
    box = predictor._transforms.transform_boxes(torch.as_tensor(BOXES, dtype=torch.float), normalize=True,
                                                orig_hw=predictor._orig_hw[0])
    labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(len(BOXES), 1)
    sparse, dense = model.sam_prompt_encoder(points=(box, labels), boxes=None, masks=None)
    _, _, tokens, objects = model.sam_mask_decoder(
        image_embeddings=predictor._features["image_embed"], image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False, repeat_image=True,
        high_res_features=predictor._features["high_res_feats"],
    )
    torch.testing.assert_close(out.tokens, tokens[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.object_scores, objects[:, 0], atol=1e-5, rtol=0)
    # chunked decoding gives the same outputs
    chunked = adapter.decode_prompts(adapter.encode_image(image), torch.as_tensor(BOXES), chunk_size=1)
    torch.testing.assert_close(chunked.tokens, out.tokens, atol=1e-5, rtol=0)


def test_hq_sam_tokens_equal_the_package(image):
    from segment_anything_hq import SamPredictor

    model = build_hq_sam("tiny", random_init=True, seed=4)
    adapter = HQSamRegionTokens(model)
    out = adapter.decode_prompts(adapter.encode_image(image), torch.as_tensor(BOXES))
    predictor = SamPredictor(model)
    predictor.set_image(image)
    captured = []
    handle = model.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.append(o[0][:, 1]))
    _, iou, low_res = predictor.predict_torch(
        None, None, predictor.transform.apply_boxes_torch(torch.as_tensor(BOXES, dtype=torch.float64),
                                                          image.shape[:2]).float(),
        multimask_output=False, return_logits=True,
    )
    handle.remove()
    torch.testing.assert_close(out.low_res_masks, low_res, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mask_scores, iou[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.tokens, captured[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [TINY_OPEN_CLIP, TINY_EVA02_CLIP])
def test_open_clip_dense_map_equals_the_package(image, name):
    model = build_open_clip(name, random_init=True, seed=5)
    vlm = OpenClipDenseFeatures(model, open_clip_tokenizer(name), 0)
    x = vlm.preprocess(vlm.image_to_tensor(image))
    dense = vlm.dense_features(x, preprocessed=True)
    assert dense.shape == (1, vlm.num_tokens, vlm.width)
    visual = model.visual
    with torch.no_grad():
        if vlm.timm_tower:  # the last block before timm's final norm: norm(dense) is forward_features
            torch.testing.assert_close(visual.trunk.norm(dense), visual.trunk.forward_features(x), atol=1e-5, rtol=0)
        else:
            ref = visual.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NLC",
                                               output_extra_tokens=True)
            expected = torch.cat([ref["image_intermediates_prefix"][-1], ref["image_intermediates"][-1]], dim=1)
            torch.testing.assert_close(dense, expected, atol=1e-5, rtol=0)
            # and the package's pooled image embedding follows from it (final norm, pooling, projection)
            pooled = visual.ln_post(dense[:, 0]) @ visual.proj
            torch.testing.assert_close(pooled, model.encode_image(x), atol=1e-5, rtol=0)
        import open_clip

        tokens = open_clip.get_tokenizer(name)(["a photo of a cat", "a dog"])
        torch.testing.assert_close(vlm.encode_text(vlm.tokenize(["a photo of a cat", "a dog"])),
                                   model.encode_text(tokens))


def test_hf_tokenizer_models_fail_with_a_clear_message():
    with pytest.raises(TokenizerFilesMissing, match=r"google/mt5-base.*tokenizer\.json.*MODEL\.REGIONSPOT\.VLM\.TOKENIZER"):
        build_vlm(tiny_cfg("MODEL.REGIONSPOT.VLM.NAME", "OpenClipDenseFeatures",
                           "MODEL.REGIONSPOT.VLM.TYPE", "RegionSpot-tiny-HFTokenizer"))
    with pytest.raises(TokenizerFilesMissing, match="holds no tokenizer.json"):
        open_clip_tokenizer("ViT-L-14-worldwide-quickgelu", "/nonexistent-folder")
    with pytest.raises(ValueError, match="not an open_clip model config"):
        open_clip_tokenizer("No-Such-Model")


def _recognize(head, image):
    regions = Instances(image.shape[:2])
    regions.proposal_boxes = Boxes(torch.as_tensor(BOXES, dtype=torch.float32))
    return head.recognize(image, regions, per_region=True)


@pytest.mark.parametrize("opts", [SAM2 + OPENCLIP, HQ, OPENCLIP], ids=["sam2+openclip", "hqsam+clip", "sam+openclip"])
def test_head_recognizes_with_any_pair(image, opts):
    cfg = tiny_cfg(*opts, "MODEL.REGIONSPOT.VOCAB.SOURCE", "custom", "MODEL.REGIONSPOT.VOCAB.CUSTOM", ["cat", "dog"],
                   "MODEL.REGIONSPOT.LOCALIZER.OBJECT_SCORE_AS_BOX_SCORE", True)
    head = RegionSpotROIHeads(cfg, None).eval()
    # the fusion module takes its widths from the configured pair
    assert (head.fusion.to_clip.in_features, head.fusion.to_clip.out_features) == (head.sam.token_dim, head.clip.width)
    out = _recognize(head, image)
    assert len(out) == len(BOXES) and out.pred_classes.max() < 2
    masks = out.pred_masks.to_bitmasks(None, *image.shape[:2])
    assert masks.tensor.shape == (len(BOXES), *image.shape[:2])
    # text embeddings come from the configured VLM's tower
    assert head.classifier.embed_dim == head.clip.embed_dim


def test_checkpoints_record_the_pair_and_refuse_another(tmp_path, image):
    head = RegionSpotROIHeads(tiny_cfg(*SAM2), None)
    model = torch.nn.Module()
    model.roi_heads = head
    RegionSpotCheckpointer(model, save_dir=str(tmp_path)).save("sam2")
    saved = torch.load(tmp_path / "sam2.pth", weights_only=True)
    assert saved["frozen_pair"]["localizer"] == "Sam2RegionTokens" and saved["frozen_pair"]["vlm"] == "ClipDenseFeatures"
    # same pair: loads
    RegionSpotCheckpointer(model).load(str(tmp_path / "sam2.pth"))
    # another localizer with the same token width: refused, naming both
    other = torch.nn.Module()
    other.roi_heads = RegionSpotROIHeads(tiny_cfg(), None)
    with pytest.raises(WeightsFileError, match=r"trained with localizer Sam2RegionTokens \(tiny\).*builds localizer SamRegionTokens"):
        RegionSpotCheckpointer(other).load(str(tmp_path / "sam2.pth"))
    # a file without the record (released / earlier checkpoints) is the released pair's
    del saved["frozen_pair"]
    torch.save(saved, tmp_path / "old.pth")
    RegionSpotCheckpointer(other).load(str(tmp_path / "old.pth"))
    with pytest.raises(WeightsFileError, match="records no pair"):
        RegionSpotCheckpointer(model).load(str(tmp_path / "old.pth"))
