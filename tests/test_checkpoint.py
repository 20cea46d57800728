"""Checkpoints: our round trip, the authors' released layout, wrong variants, missing files."""
import logging

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import tiny_cfg
from regionspot import RegionSpotCheckpointer

BOXES = np.array([[5.0, 5.0, 100.0, 120.0], [60.0, 20.0, 200.0, 190.0], [0.0, 0.0, 50.0, 50.0]])


def _model(seed):
    torch.manual_seed(seed)  # the fusion module's initialisation
    return build_model(tiny_cfg()).eval()


def _logits(model, image):
    head = model.roi_heads
    state, feats = head.encode_image(image)
    tokens = head.sam.decode_prompts(state, BOXES, with_masks=False).tokens
    with torch.no_grad():
        return head.classifier(head.region_embeddings(tokens[None], feats)[0])


def _released_layout(model, with_frozen):
    """Our weights in the authors' layout: model.{to_clip,decoder,projector}.* (+ frozen keys)."""
    sd = {"model." + k[len("roi_heads.fusion."):]: v.clone() for k, v in model.state_dict().items()}
    if with_frozen:
        for k, v in model.roi_heads.sam.sam.state_dict().items():
            sd["model.sam." + k] = v
        for k, v in model.roi_heads.clip.model.state_dict().items():
            sd["model.clip_model." + k] = v
    return {"model": sd, "iteration": 449999}


def test_checkpoint_holds_only_the_fusion_module_and_round_trips(tmp_path, photo):
    a, b = _model(0), _model(1)
    assert not torch.equal(_logits(a, photo), _logits(b, photo))
    keys = list(a.state_dict())
    # to_clip + projector, 18 tensors per decoder layer (tiny config: 2 layers), final norm
    assert len(keys) == 4 + 18 * 2 + 2 and all(k.startswith("roi_heads.fusion.") for k in keys)
    DetectionCheckpointer(a, save_dir=str(tmp_path)).save("model_final")
    RegionSpotCheckpointer(b).load(str(tmp_path / "model_final.pth"))
    assert torch.equal(_logits(a, photo), _logits(b, photo))


@pytest.mark.parametrize("with_frozen", [False, True])
@pytest.mark.parametrize("checkpointer", [RegionSpotCheckpointer, DetectionCheckpointer])
def test_released_layout_loads(tmp_path, photo, with_frozen, checkpointer, caplog):
    a, b = _model(0), _model(1)
    path = tmp_path / "released.pth"
    torch.save(_released_layout(a, with_frozen), path)
    with caplog.at_level(logging.WARNING):
        checkpointer(b).load(str(path))
    assert torch.equal(_logits(a, photo), _logits(b, photo))
    # No "missing"/"unexpected" noise about SAM, CLIP or the converted keys.
    noisy = [r.getMessage() for r in caplog.records if "not found in" in r.getMessage() or "not used" in r.getMessage()]
    assert noisy == []


def _bl_shaped_released_checkpoint():
    from regionspot.modeling.fusion import RegionSpotFusion

    fusion = RegionSpotFusion(256, 1024, 768)
    return {"model": {"model." + k: v for k, v in fusion.state_dict().items()}}


@pytest.mark.parametrize("checkpointer", [RegionSpotCheckpointer, DetectionCheckpointer])
def test_wrong_variant_names_both(tmp_path, checkpointer):
    path = tmp_path / "bl.pth"
    torch.save(_bl_shaped_released_checkpoint(), path)
    with pytest.raises(ValueError) as e:
        checkpointer(_model(0)).load(str(path))
    msg = str(e.value)
    assert "RegionSpot-BL (CLIP ViT-L/14)" in msg and "CLIP width 64" in msg and "CLIP.TYPE" in msg


def test_wrong_variant_in_our_layout(tmp_path):
    sd = {"roi_heads.fusion." + k[len("model."):]: v for k, v in _bl_shaped_released_checkpoint()["model"].items()}
    path = tmp_path / "ours_bl.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="RegionSpot-BL"):
        RegionSpotCheckpointer(_model(0)).load(str(path))


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_ckpt.pth"):
        RegionSpotCheckpointer(_model(0)).load(str(tmp_path / "missing_ckpt.pth"))
