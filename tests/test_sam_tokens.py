"""SAM adapter: tokens are what SAM computes inside its mask decoder; masks are stock SAM's."""
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from conftest import DEVICES
from regionspot.modeling.sam_tokens import SamRegionTokens, build_sam


def _sam(seed=3):
    """Tiny SAM whose relative-position tables (zeros at init) are random too."""
    sam = build_sam("tiny", random_init=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sam


@pytest.fixture(scope="module")
def sam():
    """Stock forwards (the reference)."""
    return _sam()


@pytest.fixture(scope="module")
def tokens_model():
    """Same weights, fast path (fused encoder attention, shared-image decoding)."""
    return SamRegionTokens(_sam(), fast=True)


BOXES = np.array([[10.0, 20.0, 120.0, 150.0], [50.5, 5.25, 200.0, 90.0], [0.0, 0.0, 239.0, 199.0]])


def _internal_tokens(sam, embedding, boxes_1024):
    """Mask token 0 after SAM's two-way transformer, recomputed from the stock modules."""
    dec = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes_1024, masks=None)
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens[None].expand(len(sparse), -1, -1), sparse], dim=1)
    src = torch.repeat_interleave(embedding, len(sparse), dim=0) + dense
    pos = torch.repeat_interleave(sam.prompt_encoder.get_dense_pe(), len(sparse), dim=0)
    hs, _ = dec.transformer(src, pos, tokens)
    return hs[:, 1, :]


def test_shapes_and_frozen(tokens_model, photo):
    state = tokens_model.encode_image(photo)
    g = state.embedding.shape[-1]
    assert state.embedding.shape == (1, tokens_model.token_dim, g, g)
    assert state.original_size == photo.shape[:2]
    out = tokens_model.decode_prompts(state, BOXES)
    assert out.tokens.shape == (3, tokens_model.token_dim)
    assert out.low_res_masks.shape == (3, 1, 4 * g, 4 * g)
    assert out.mask_scores.shape == (3,)
    assert all(not p.requires_grad for p in tokens_model.parameters())
    tokens_model.train()
    assert not tokens_model.training and not tokens_model.sam.training


def test_tokens_equal_sam_internal_and_masks_equal_stock_predictor(tokens_model, sam, photo):
    state = tokens_model.encode_image(photo)
    out = tokens_model.decode_prompts(state, BOXES)

    stock = SamPredictor(sam)
    stock.set_image(photo)
    torch.testing.assert_close(stock.features, state.embedding, rtol=0, atol=1e-5)
    boxes_1024 = torch.as_tensor(stock.transform.apply_boxes(BOXES, photo.shape[:2]), dtype=torch.float32)
    with torch.no_grad():
        expected = _internal_tokens(sam, stock.features, boxes_1024)
    torch.testing.assert_close(out.tokens, expected, rtol=0, atol=1e-6)

    masks = tokens_model.postprocess_masks(out.low_res_masks, state)
    for i, box in enumerate(BOXES):
        m, iou, low = stock.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(low[0], out.low_res_masks[i, 0].numpy(), atol=1e-5)
        assert (m[0] == masks[i].numpy()).mean() > 0.9999
        assert abs(iou[0] - out.mask_scores[i].item()) < 1e-5


def test_chunking_and_empty(tokens_model, photo):
    state = tokens_model.encode_image(photo)
    whole = tokens_model.decode_prompts(state, BOXES, chunk_size=256)
    chunked = tokens_model.decode_prompts(state, torch.as_tensor(BOXES), chunk_size=2)
    torch.testing.assert_close(whole.tokens, chunked.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.low_res_masks, chunked.low_res_masks, rtol=0, atol=1e-5)
    empty = tokens_model.decode_prompts(state, np.zeros((0, 4)))
    assert empty.tokens.shape == (0, tokens_model.token_dim) and empty.low_res_masks.shape[0] == 0
    assert tokens_model.postprocess_masks(empty.low_res_masks, state).shape == (0, *photo.shape[:2])


def test_point_prompts(tokens_model, photo):
    state = tokens_model.encode_image(photo)
    points = np.array([[[60.0, 80.0], [100.0, 30.0]], [[10.0, 10.0], [200.0, 150.0]]])
    labels = np.array([[1, 0], [1, 1]])
    out = tokens_model.decode_prompts(state, points=points, point_labels=labels)
    assert out.tokens.shape == (2, tokens_model.token_dim)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="SAM.WEIGHTS is empty"):
        build_sam("vit_b")
    with pytest.raises(ValueError, match="unknown"):
        build_sam("vit_x", random_init=True)
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_sam("tiny", weights=missing)
    sd = build_sam("tiny", random_init=True).state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="do not fit MODEL.REGIONSPOT.SAM.TYPE='tiny'"):
        build_sam("tiny", weights=str(bad))


def test_weights_round_trip(tmp_path, photo):
    a = build_sam("tiny", random_init=True, seed=7)
    path = tmp_path / "sam_tiny.pth"
    torch.save(a.state_dict(), path)
    b = build_sam("tiny", weights=str(path))
    sa, sb = SamRegionTokens(a), SamRegionTokens(b)
    torch.testing.assert_close(sa.encode_image(photo).embedding, sb.encode_image(photo).embedding, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,chunk", [(0, 4), (1, 4), (4, 4), (5, 4), (9, 4)])
def test_fast_path_equals_stock_path(tokens_model, photo, n, chunk, device):
    """
    N = 0, 1, a full chunk and a chunk boundary; tokens, masks and IoU equal the stock forwards (on a
    GPU with its own attention kernels, to 10x the CPU tolerance).
    """
    if device != "cpu":
        tokens_model = SamRegionTokens(_sam(), fast=True).to(device)
    reference = SamRegionTokens(_sam(), fast=False).to(device)
    atol = 1e-5 if device == "cpu" else 1e-4
    rng = np.random.RandomState(n)
    xy = rng.rand(n, 2) * 150
    boxes = np.concatenate([xy, xy + 20 + rng.rand(n, 2) * 80], axis=1)
    fast_state, ref_state = tokens_model.encode_image(photo), reference.encode_image(photo)
    torch.testing.assert_close(fast_state.embedding, ref_state.embedding, rtol=0, atol=atol)
    fast = tokens_model.decode_prompts(fast_state, boxes, chunk_size=chunk)
    ref = reference.decode_prompts(ref_state, boxes, chunk_size=chunk)
    torch.testing.assert_close(fast.tokens, ref.tokens, rtol=0, atol=atol)
    torch.testing.assert_close(fast.mask_scores, ref.mask_scores, rtol=0, atol=atol)
    torch.testing.assert_close(fast.low_res_masks, ref.low_res_masks, rtol=0, atol=10 * atol)
    fast_masks = tokens_model.postprocess_masks(fast.low_res_masks, fast_state)
    ref_masks = reference.postprocess_masks(ref.low_res_masks, ref_state)
    assert fast_masks.shape == ref_masks.shape
    # Logits agree to 1e-4; a pixel may flip only where a logit sits on the threshold.
    assert n == 0 or (fast_masks != ref_masks).float().mean() <= 10 * atol
    no_masks = tokens_model.decode_prompts(fast_state, boxes, with_masks=False, chunk_size=chunk)
    assert no_masks.low_res_masks is None
    torch.testing.assert_close(no_masks.tokens, fast.tokens, rtol=0, atol=0)


def test_fast_point_prompts_equal_stock(tokens_model, photo):
    reference = SamRegionTokens(_sam(), fast=False)
    points = np.array([[[60.0, 80.0], [100.0, 30.0]], [[10.0, 10.0], [200.0, 150.0]]])
    labels = np.array([[1, 0], [1, 1]])
    fast = tokens_model.decode_prompts(tokens_model.encode_image(photo), points=points, point_labels=labels)
    ref = reference.decode_prompts(reference.encode_image(photo), points=points, point_labels=labels)
    torch.testing.assert_close(fast.tokens, ref.tokens, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(200, 240), (333, 517), (1001, 97)])
def test_prompts_reach_sams_frame_as_samp_predictor_maps_them(tokens_model, size):
    """
    Boxes and points stay tensors: mapped into SAM's input frame in float64 on the device, they equal
    bit for bit what the stock ResizeLongestSide does in numpy for SamPredictor.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    from regionspot.modeling.sam_tokens import SamImageState

    rng = np.random.default_rng(0)
    h, w = size
    boxes = np.sort(rng.uniform(-5, max(h, w) + 5, size=(7, 2, 2)), axis=1).reshape(7, 4)
    points = rng.uniform(0, min(h, w), size=(7, 3, 2))
    labels = rng.integers(0, 2, size=(7, 3))
    state = SamImageState(embedding=torch.zeros(1), input_size=(0, 0), original_size=(h, w))
    transform = ResizeLongestSide(tokens_model.sam.image_encoder.img_size)
    for dtype in (torch.float32, torch.float64):
        sam_boxes, (sam_points, sam_labels) = tokens_model._prompts_to_sam_frame(
            state, torch.as_tensor(boxes, dtype=dtype), torch.as_tensor(points, dtype=dtype), torch.as_tensor(labels)
        )
        stock_boxes = transform.apply_boxes(torch.as_tensor(boxes, dtype=dtype).double().numpy(), (h, w))
        stock_points = transform.apply_coords(torch.as_tensor(points, dtype=dtype).double().numpy(), (h, w))
        assert torch.equal(sam_boxes, torch.as_tensor(stock_boxes, dtype=torch.float32))
        assert torch.equal(sam_points, torch.as_tensor(stock_points, dtype=torch.float32))
        assert torch.equal(sam_labels, torch.as_tensor(labels))
