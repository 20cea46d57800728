"""
Guarded weight files (one of the tests/test_guard_*.py files): every way a weights file can be
unusable (missing, empty, cut short, a web page or text saved under its name, another model's
weights, part of the fusion module, pickled Python objects) gives one exception that names the file
and its config key and says what the file should be; a RegionSpot head whose fusion module nothing
loaded is not evaluated unless MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM says so.
"""
import copy
import pickle

import numpy as np
import pytest
import torch
from clip.model import convert_weights
from torch import nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import tiny_cfg
from regionspot import RegionSpotCheckpointer
from regionspot.checkpoint import WeightsFileError, check_head_weights, describe_weights, fusion_weights_source
from regionspot.modeling import build_clip, build_sam, load_head_weights
from regionspot.modeling.fusion import RegionSpotFusion

WEIGHTS = "MODEL.WEIGHTS"
SAM = "MODEL.REGIONSPOT.SAM.WEIGHTS"
CLIP = "MODEL.REGIONSPOT.CLIP.WEIGHTS"
HEAD = "MODEL.REGIONSPOT.HEAD.WEIGHTS"
DETECTOR = "MODEL.REGIONSPOT.DETECTOR.WEIGHTS"
KEYS = [WEIGHTS, SAM, CLIP, HEAD, DETECTOR]


def _nested(**children):
    return nn.ModuleDict(children)


class _Detector(nn.Module):
    """Stands in for a detectron2 detector: its state dict has a detector's key names."""

    def __init__(self):
        super().__init__()
        self.backbone = _nested(bottom_up=_nested(stem=_nested(conv1=nn.Conv2d(3, 4, 1))))
        self.roi_heads = _nested(box_predictor=_nested(cls_score=nn.Linear(4, 3)))


class _Host(nn.Module):
    """Stands in for a GeneralizedRCNN with a RegionSpot head: detector weights + a fusion module."""

    def __init__(self):
        super().__init__()
        self.backbone = _nested(bottom_up=_nested(stem=_nested(conv1=nn.Conv2d(3, 4, 1))))
        self.roi_heads = _nested(fusion=RegionSpotFusion(8, 16, 8, num_layers=1, num_heads=2, dim_feedforward=16))


def _model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


def _load(key, path, model=None):
    """Load ``path`` the way the code that reads ``key`` does."""
    if key == WEIGHTS:
        return RegionSpotCheckpointer(model or _model()).load(path)
    if key == SAM:
        return build_sam("tiny", path)
    if key == CLIP:
        return build_clip("tiny", path)
    if key == HEAD:
        return load_head_weights(model or _model(), path)
    return RegionSpotCheckpointer(model or _Detector(), config_key=DETECTOR).load(path)


class _Trap:
    """Unpickling this creates the file ``marker``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real files of each kind, made from the tiny models, and broken ones."""
    d = tmp_path_factory.mktemp("weights")
    paths = {name: str(d / f"{name}.pth") for name in
             ("sam", "clip", "regionspot", "detector", "empty", "truncated", "html", "text", "partial")}
    torch.save(build_sam("tiny", "", True, 0).state_dict(), paths["sam"])
    torch.save(build_clip("tiny", "", True, 1).state_dict(), paths["clip"])
    torch.manual_seed(1)
    DetectionCheckpointer(build_model(tiny_cfg()), save_dir=str(d)).save("regionspot")
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(4, 3, 1, 1),
                          "roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 4)}}, paths["detector"])
    open(paths["empty"], "wb").close()
    data = open(paths["sam"], "rb").read()
    open(paths["truncated"], "wb").write(data[: len(data) // 2])
    with open(paths["html"], "w") as f:
        f.write("<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title></head></html>\n")
    with open(paths["text"], "w") as f:
        f.write("404: Not Found\n")
    state = torch.load(paths["regionspot"], weights_only=True)["model"]
    state.pop("roi_heads.fusion.projector.weight")
    torch.save({"model": state}, paths["partial"])
    return paths


def _assert_names(err, path, key):
    msg = str(err)
    assert path in msg and key in msg, msg
    assert "must be" in msg  # what the file should be
    if isinstance(err, WeightsFileError):
        assert err.path == path and err.config_key == key


# -----------------------------------------------------------------------------------------------
# Unusable files, for every key
@pytest.mark.parametrize("key", KEYS)
def test_missing_file(key, tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError) as e:
        _load(key, path)
    assert path in str(e.value) and key in str(e.value) and "does not exist" in str(e.value)


@pytest.mark.parametrize("case, gist", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "cut short or corrupt"),
    ("html", "is an HTML page"),
    ("text", "is a text file"),
])
@pytest.mark.parametrize("key", KEYS)
def test_unreadable_file(files, key, case, gist):
    with pytest.raises(WeightsFileError) as e:
        _load(key, files[case])
    _assert_names(e.value, files[case], key)
    assert gist in str(e.value)
    if case != "empty":  # torch's own error is chained, not shown raw
        assert e.value.__cause__ is not None


def test_pickled_code_never_runs(tmp_path):
    """weights_only=True: a checkpoint with pickled Python objects is refused before anything runs."""
    marker = tmp_path / "pwned"
    path = str(tmp_path / "trap.pth")
    state = {"model": _model().state_dict(), "extra": _Trap(str(marker))}
    torch.save(state, path)
    for key in (WEIGHTS, SAM, HEAD):
        with pytest.raises(WeightsFileError, match="holds Python objects besides tensors") as e:
            _load(key, path)
        _assert_names(e.value, path, key)
    assert not marker.exists()


# -----------------------------------------------------------------------------------------------
# Another model's weights
@pytest.mark.parametrize("name, key, looks_like, belongs", [
    ("sam", CLIP, "looks like SAM weights (keys image_encoder.*", SAM),
    ("clip", SAM, "looks like OpenAI CLIP", CLIP),
    ("regionspot", SAM, "looks like a RegionSpot checkpoint", WEIGHTS),
    ("regionspot", CLIP, "looks like a RegionSpot checkpoint", WEIGHTS),
    ("detector", WEIGHTS, "looks like a detectron2 detector checkpoint", DETECTOR),
    ("sam", WEIGHTS, "looks like SAM weights", SAM),
    ("clip", WEIGHTS, "looks like OpenAI CLIP", CLIP),
    ("detector", HEAD, "looks like a detectron2 detector checkpoint", DETECTOR),
    ("sam", HEAD, "looks like SAM weights", SAM),
    ("regionspot", DETECTOR, "looks like a RegionSpot checkpoint", WEIGHTS),
])
def test_wrong_model(files, name, key, looks_like, belongs):
    model = _model() if key in (WEIGHTS, HEAD) else None
    before = {k: v.clone() for k, v in model.state_dict().items()} if model is not None else None
    with pytest.raises(WeightsFileError) as e:
        _load(key, files[name], model)
    _assert_names(e.value, files[name], key)
    msg = str(e.value)
    assert looks_like in msg and f"belongs in {belongs}" in msg, msg
    if model is not None:  # refused before anything was loaded
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert fusion_weights_source(model) is None


def test_detector_checkpoint_as_model_weights_lists_its_keys(files):
    with pytest.raises(WeightsFileError) as e:
        RegionSpotCheckpointer(_model()).load(files["detector"])
    msg = str(e.value)
    assert "holds no RegionSpot fusion weights" in msg and "'model.to_clip.weight'" in msg
    assert "'backbone.bottom_up.stem.conv1.weight'" in msg and "'roi_heads.box_predictor.cls_score.weight'" in msg


@pytest.mark.parametrize("key", [WEIGHTS, HEAD])
def test_partial_fusion_weights(files, key):
    with pytest.raises(WeightsFileError) as e:
        _load(key, files["partial"])
    _assert_names(e.value, files["partial"], key)
    msg = str(e.value)
    assert "only part of the RegionSpot fusion weights" in msg and "1 of the 42" in msg
    assert "projector.weight'" in msg


def test_torchscript_archive_where_a_state_dict_belongs(tmp_path):
    """OpenAI's CLIP files are TorchScript: read as CLIP weights, refused (and named) as SAM's."""
    clip_model = build_clip("tiny", "", True, 1)
    path = str(tmp_path / "ViT-tiny.pt")
    traced = torch.jit.trace(clip_model, (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)),
                             check_trace=False)
    traced.save(path)
    loaded = build_clip("tiny", path)
    rounded = copy.deepcopy(clip_model)  # as clip.load(jit=False) reads it: OpenAI's fp16 weights, then fp32
    convert_weights(rounded)
    want = rounded.float().state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(WeightsFileError) as e:
        build_sam("tiny", path)
    _assert_names(e.value, path, SAM)
    assert "TorchScript archive" in str(e.value) and "looks like OpenAI CLIP" in str(e.value)


def test_describe_weights():
    assert describe_weights(["model.to_clip.weight", "model.sam.image_encoder.x", "model.clip_model.visual.x"])[0] == \
        "regionspot"
    assert describe_weights(["image_encoder.pos_embed", "mask_decoder.x"])[0] == "sam"
    assert describe_weights(["visual.conv1.weight", "transformer.resblocks.0.x"])[0] == "clip"
    assert describe_weights(["res2_0_branch2a_w", "conv1_w"])[0] == "detector"
    assert describe_weights(["weight", "bias"]) is None


# -----------------------------------------------------------------------------------------------
# What still loads
def test_checkpoints_load_and_are_recorded(files, tmp_path):
    model = _model()
    RegionSpotCheckpointer(model).load(files["regionspot"])
    assert fusion_weights_source(model) == files["regionspot"]
    check_head_weights(tiny_cfg("MODEL.WEIGHTS", files["regionspot"]), model)
    # A checkpoint of a (Distributed)DataParallel model: every key under "module.".
    state = torch.load(files["regionspot"], weights_only=True)["model"]
    path = str(tmp_path / "ddp.pth")
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    other = _model()
    RegionSpotCheckpointer(other).load(path)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    # The authors' released layout, through load_head_weights too.
    released = str(tmp_path / "released.pth")
    torch.save({"model": {"model." + k[len("roi_heads.fusion."):]: v for k, v in state.items()}}, released)
    third = _model()
    load_head_weights(third, released)
    assert fusion_weights_source(third) == released
    assert all(torch.equal(v, state[k]) for k, v in third.state_dict().items())


def test_resume_from_a_training_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    DetectionCheckpointer(_model(), save_dir=str(out)).save("model_0000009", iteration=9)
    model = _model()
    RegionSpotCheckpointer(model, save_dir=str(out)).resume_or_load("", resume=True)
    check_head_weights(tiny_cfg(), model)  # MODEL.WEIGHTS empty, but the resumed checkpoint loaded the head
    (out / "model_0000009.pth").write_bytes(b"")
    with pytest.raises(WeightsFileError, match=r"OUTPUT_DIR's last_checkpoint \(resume\)='.*model_0000009.pth' is "
                                               r"empty"):
        RegionSpotCheckpointer(_model(), save_dir=str(out)).resume_or_load("", resume=True)


def test_detector_pkl_still_loads_and_is_guarded(tmp_path):
    """DETECTOR.WEIGHTS: detectron2's model-zoo .pkl (a plain pickle of numpy arrays) still loads."""
    det = _Detector()
    want = {k: v.detach().numpy() + 1.0 for k, v in det.state_dict().items()}
    pkl = str(tmp_path / "model_final.pkl")
    with open(pkl, "wb") as f:
        pickle.dump({"model": want, "__author__": "Detectron2 Model Zoo"}, f)
    RegionSpotCheckpointer(det, config_key=DETECTOR).load(pkl)
    assert all(np.allclose(v.numpy(), want[k]) for k, v in det.state_dict().items())
    data = open(pkl, "rb").read()
    open(pkl, "wb").write(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="cut short") as e:
        RegionSpotCheckpointer(det, config_key=DETECTOR).load(pkl)
    _assert_names(e.value, pkl, DETECTOR)


# -----------------------------------------------------------------------------------------------
# A random fusion module is not evaluated unless asked for
def test_random_head_needs_allow_random_head(tmp_path):
    # Before the model is built: nothing could load the fusion module.
    cfg = tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", False, "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty.*HEAD.ALLOW_RANDOM True"):
        check_head_weights(cfg)
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        check_head_weights(cfg, resume=True)  # nothing to resume from
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    check_head_weights(cfg, resume=True)
    check_head_weights(tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", True))
    check_head_weights(tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", False, "MODEL.WEIGHTS", "w.pth"))
    # After loading: what the loaders recorded.
    model = _model()
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty.*HEAD.ALLOW_RANDOM True"):
        check_head_weights(tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", False), model)
    check_head_weights(tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", True), model)
    with pytest.raises(ValueError, match="HEAD.WEIGHTS='w.pth' is set but was not loaded"):
        check_head_weights(tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", False,
                                    "MODEL.REGIONSPOT.HEAD.WEIGHTS", "w.pth"), model)


def test_detector_weights_into_a_host_model_need_head_weights(files, tmp_path):
    """A GeneralizedRCNN recipe: MODEL.WEIGHTS is the detector's, the fusion module comes from HEAD.WEIGHTS."""
    host = _Host()
    RegionSpotCheckpointer(host).load(files["detector"])  # accepted, with a warning
    assert torch.equal(host.backbone.bottom_up.stem.conv1.weight, torch.zeros(4, 3, 1, 1))
    cfg = tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", False, "MODEL.WEIGHTS", files["detector"])
    with pytest.raises(ValueError, match="holds no RegionSpot fusion weights.*HEAD.WEIGHTS is empty"):
        check_head_weights(cfg, host)
    head = str(tmp_path / "head.pth")
    torch.save({"model": {"roi_heads.fusion." + k: v for k, v in _Host().roi_heads.fusion.state_dict().items()}}, head)
    load_head_weights(host, head)
    check_head_weights(cfg, host)
    # The host still refuses a file that holds none of its tensors (SAM's), or part of the fusion module.
    with pytest.raises(WeightsFileError, match="looks like SAM weights"):
        RegionSpotCheckpointer(_Host()).load(files["sam"])


def test_predictor_refuses_an_unloaded_head():
    """RegionSpotPredictor with no MODEL.WEIGHTS evaluates a random head only when told to."""
    from regionspot import RegionSpotPredictor

    with pytest.raises(ValueError, match="HEAD.ALLOW_RANDOM"):
        RegionSpotPredictor(tiny_cfg("MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", False))
    assert RegionSpotPredictor(tiny_cfg()).model is not None  # the tiny config allows it
