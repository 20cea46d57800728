"""
The model on each device and under autocast: where work runs, which precision the frozen models use,
and what the trainer's AMP needs. The CUDA cases skip without a GPU.
"""
import numpy as np
import pytest
import torch

import regionspot
from conftest import CUDA, DEVICES, tiny_cfg
from regionspot.modeling import text_embeddings
from regionspot.modeling.clip_features import build_clip
from regionspot.modeling.sam_tokens import build_sam

BOXES = np.array([[10.0, 10.0, 120.0, 150.0], [60.0, 30.0, 230.0, 190.0], [100.0, 100.0, 140.0, 130.0]])
# The autocast dtype each device type supports for the frozen models' convolutions and matmuls.
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def test_building_frozen_models_leaves_other_generators_alone(monkeypatch):
    """Seeded random weights use the CPU generator only, and restore it; CUDA generators are not re-seeded."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("manual_seed_all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("manual_seed", seed)))
    build_sam("tiny", random_init=True, seed=0)
    build_clip("tiny", random_init=True, seed=1)
    assert calls == []
    assert torch.equal(torch.get_rng_state(), state)
    # Same seed, same weights, whatever the caller's generator state.
    torch.default_generator.manual_seed(99)
    a = build_sam("tiny", random_init=True, seed=0).state_dict()
    b = build_sam("tiny", random_init=True, seed=0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("device", DEVICES)
def test_model_and_vocabulary_on_the_configured_device(device, photo, monkeypatch):
    """The vocabulary is encoded where the model runs (not on the CPU before build_model moves it)."""
    seen = []
    original = text_embeddings.encode_vocabulary

    def recording(clip_features, *args, **kwargs):
        seen.append(next(clip_features.parameters()).device.type)
        return original(clip_features, *args, **kwargs)

    monkeypatch.setattr(text_embeddings, "encode_vocabulary", recording)
    cfg = tiny_cfg("MODEL.DEVICE", device, "MODEL.REGIONSPOT.VOCAB.CUSTOM", ["a device test vocabulary", "b"],
                   "MODEL.REGIONSPOT.VOCAB.SOURCE", "custom")
    predictor = regionspot.RegionSpotPredictor(cfg)
    assert seen == [device]
    assert {p.device.type for p in predictor.model.parameters()} == {device}
    assert predictor.head.classifier.text_embeddings.device.type == device
    predictor.set_image(photo)
    out = predictor.predict(BOXES)
    assert out["logits"].shape == (len(BOXES), 2) and out["masks"].shape == (len(BOXES), *photo.shape[:2])


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_frozen_models_stay_fp32_inside_autocast(device, photo):
    """
    FROZEN.PRECISION fp32 holds inside an enclosing autocast region (as detectron2's AMPTrainer opens
    one): SAM's and CLIP's outputs are bit-identical to those outside it; with bf16/fp16 they are not.
    """
    torch.manual_seed(0)
    predictor = regionspot.RegionSpotPredictor(tiny_cfg("MODEL.DEVICE", device))
    head = predictor.head
    with torch.inference_mode():
        state, feats = head.encode_image(photo)
        with torch.autocast(device_type=device, dtype=AUTOCAST_DTYPE[device]):
            state_ac, feats_ac = head.encode_image(photo)
            tokens_ac = head.sam.decode_prompts(state_ac, BOXES).tokens
        tokens = head.sam.decode_prompts(state, BOXES).tokens
    assert feats_ac.dtype == torch.float32 and tokens_ac.dtype == torch.float32
    assert torch.equal(state_ac.embedding, state.embedding)
    assert torch.equal(feats_ac, feats)
    assert torch.equal(tokens_ac, tokens)

    # The check can fail: the same forwards with reduced-precision frozen models differ.
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[AUTOCAST_DTYPE[device]]
    head.sam.set_precision(precision)
    head.clip.set_precision(precision)
    with torch.inference_mode():
        _, feats_low = head.encode_image(photo)
    assert feats_low.dtype == torch.float32 and not torch.equal(feats_low, feats)


def test_amp_training_needs_cuda(tmp_path):
    from regionspot.engine import Trainer

    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", "cpu")
    with pytest.raises(ValueError, match=r"SOLVER.AMP.ENABLED=True needs a CUDA device.*FROZEN.PRECISION"):
        Trainer(cfg)


@pytest.mark.parametrize("device", [CUDA])
def test_amp_training_on_cuda(device, tmp_path):
    """detectron2's AMPTrainer: the fusion module trains under fp16 autocast; SAM and CLIP stay frozen."""
    from detectron2.engine import AMPTrainer

    from regionspot.engine import Trainer

    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", device,
                   "SOLVER.MAX_ITER", 20, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.CHECKPOINT_PERIOD", 1000,
                   "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()")
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    model = trainer.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("roi_heads.fusion.")}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("roi_heads.fusion.")}
    trainer.train()
    loss = trainer.storage.history("total_loss").latest()
    assert np.isfinite(loss)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_cuda(device, precision, photo):
    """Autocast on the GPU: fp32 outputs, equal to fp32 up to the precision."""
    torch.manual_seed(0)
    ref = regionspot.RegionSpotPredictor(tiny_cfg("MODEL.DEVICE", device))
    torch.manual_seed(0)
    low = regionspot.RegionSpotPredictor(tiny_cfg("MODEL.DEVICE", device, "MODEL.REGIONSPOT.FROZEN.PRECISION", precision))
    ref.set_image(photo)
    low.set_image(photo)
    a, b = ref.predict(BOXES), low.predict(BOXES)
    assert b["logits"].dtype == torch.float32 and b["logits"].device.type == "cuda"
    torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=5e-2)
    assert (a["masks"] != b["masks"]).float().mean() < 0.05
