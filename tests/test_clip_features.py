"""CLIP adapter: the dense feature map is the stock ViT's last-block token sequence."""
import copy

import pytest
import torch
from clip.model import convert_weights
from torch.nn import functional as F

from regionspot.modeling.clip_features import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, ClipDenseFeatures, build_clip


@pytest.fixture(scope="module")
def clip_model():
    return build_clip("tiny", random_init=True, seed=5)


def test_feature_map_matches_stock_forward(clip_model, photo):
    feats = ClipDenseFeatures(clip_model, 64)
    x = feats.image_to_tensor(photo)
    out = feats.dense_features(x)
    assert out.shape == (1, feats.num_tokens, feats.width) == (1, 17, 64)
    # Applying CLIP's own head to our class token gives CLIP's image embedding.
    visual = clip_model.visual
    with torch.no_grad():
        stock = visual(feats.preprocess(x))
        ours = visual.ln_post(out[:, 0]) @ visual.proj
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)


def test_preprocessing_is_plain_bilinear(clip_model, photo):
    feats = ClipDenseFeatures(clip_model, 64)
    x = torch.as_tensor(photo).permute(2, 0, 1)[None].float() / 255.0
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=False)
    expected = (expected - torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(feats.preprocess(feats.image_to_tensor(photo)), expected, rtol=0, atol=0)


def test_positional_embedding_interpolation(clip_model, photo):
    native = ClipDenseFeatures(clip_model, 64)
    assert native.positional_embedding() is clip_model.visual.positional_embedding
    big = ClipDenseFeatures(clip_model, 96)  # 6x6 grid from the native 4x4
    pos = big.positional_embedding()
    assert pos.shape == (37, 64)
    torch.testing.assert_close(pos[0], clip_model.visual.positional_embedding[0])
    grid = clip_model.visual.positional_embedding[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
    torch.testing.assert_close(pos[1:], expected)
    assert big.dense_features(big.image_to_tensor(photo)).shape == (1, 37, 64)
    with pytest.raises(ValueError, match="multiple of CLIP's patch size"):
        ClipDenseFeatures(clip_model, 70)


def test_frozen(clip_model):
    feats = ClipDenseFeatures(clip_model, 64)
    feats.train()
    assert not feats.training and not clip_model.training
    assert all(not p.requires_grad for p in feats.parameters())


def test_weights_file_round_trip_and_errors(tmp_path, clip_model, photo):
    path = tmp_path / "clip_tiny.pt"
    torch.save(clip_model.state_dict(), path)
    loaded = build_clip("tiny", weights=str(path))
    # clip.load stores weights in fp16 (OpenAI's archives are fp16) before casting to fp32 on CPU.
    rounded = copy.deepcopy(clip_model)
    convert_weights(rounded)
    a, b = ClipDenseFeatures(rounded.float(), 64), ClipDenseFeatures(loaded, 64)
    torch.testing.assert_close(a.dense_features(a.image_to_tensor(photo)), b.dense_features(b.image_to_tensor(photo)))
    with pytest.raises(ValueError, match="CLIP.TYPE='ViT-B/16' expects"):
        build_clip("ViT-B/16", weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_clip("ViT-B/16", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="CLIP.WEIGHTS is empty"):
        build_clip("ViT-B/16")
