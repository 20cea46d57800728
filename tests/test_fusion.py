"""Fusion module: the released architecture (keys, shapes, parameter counts) and its behaviour."""
import pytest
import torch

from regionspot.modeling.fusion import RegionSpotFusion
from regionspot.modeling.zero_shot_classifier import region_text_logits


def released_keys():
    keys = {f"{m}.{p}" for m in ("to_clip", "projector") for p in ("weight", "bias")}
    for i in range(3):
        for attn in ("self_attn", "multihead_attn"):
            keys |= {f"decoder.layers.{i}.{attn}.{p}" for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
        keys |= {f"decoder.layers.{i}.{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3") for p in ("weight", "bias")}
    return keys | {"decoder.norm.weight", "decoder.norm.bias"}


@pytest.mark.parametrize("clip_dim,embed_dim,count", [(768, 512, 24_226_304), (1024, 768, 38_853_376)])
def test_released_architecture(clip_dim, embed_dim, count):
    fusion = RegionSpotFusion(256, clip_dim, embed_dim)
    sd = fusion.state_dict()
    assert set(sd) == released_keys() and len(sd) == 60
    assert sum(p.numel() for p in fusion.parameters()) == count
    assert sd["to_clip.weight"].shape == (clip_dim, 256)
    assert sd["projector.weight"].shape == (embed_dim, clip_dim)
    assert sd["decoder.layers.0.linear1.weight"].shape == (2048, clip_dim)


def _reference_fusion(f: RegionSpotFusion, tokens, feats):
    """The decoder written out from the method's description with the same weights."""
    x = f.to_clip(tokens)
    for layer in f.decoder.layers:
        x = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
        x = layer.norm2(x + layer.multihead_attn(x, feats, feats, need_weights=False)[0])
        x = layer.norm3(x + layer.linear2(torch.relu(layer.linear1(x))))
    return f.projector(f.decoder.norm(x))


def test_matches_written_out_decoder_and_is_deterministic():
    torch.manual_seed(0)
    f = RegionSpotFusion(32, 64, 16, num_layers=3, num_heads=8, dim_feedforward=128).eval()
    tokens, feats = torch.randn(1, 5, 32), torch.randn(1, 17, 64)
    with torch.no_grad():
        out = f(tokens, feats)
        torch.testing.assert_close(out, _reference_fusion(f, tokens, feats), rtol=0, atol=1e-5)
        torch.testing.assert_close(out, f(tokens, feats), rtol=0, atol=0)
    assert out.shape == (1, 5, 16)


def test_padding_mask_equals_images_alone():
    torch.manual_seed(1)
    f = RegionSpotFusion(32, 64, 16, num_layers=2, num_heads=4, dim_feedforward=64).eval()
    a, b = torch.randn(3, 32), torch.randn(1, 32)
    feats = torch.randn(2, 17, 64)
    batch = torch.zeros(2, 3, 32)
    batch[0], batch[1, :1] = a, b
    pad = torch.tensor([[False, False, False], [False, True, True]])
    with torch.no_grad():
        both = f(batch, feats, pad)
        torch.testing.assert_close(both[0], f(a[None], feats[:1])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(both[1, :1], f(b[None], feats[1:])[0], rtol=0, atol=1e-5)


def test_logits_are_scaled_cosine():
    region = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    logits = region_text_logits(region, text, 100.0)
    expected = 100.0 * torch.tensor([[0.6, 0.8, 1.0], [0.0, 1.0, 0.8]])
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-4)
