"""
Weight files of RegionSpot: reading them safely, recognising whose weights they hold, and the
conversion of the authors' released RegionSpot checkpoints to our layout (the one home of both).

Released checkpoints keep the trainable module under ``model.{to_clip,decoder,projector}.*`` and,
in full training checkpoints, the frozen weights under ``model.sam.*`` / ``model.clip_model.*``.
Our models keep the module in the ROI head as ``roi_heads.fusion.*`` and never store SAM or CLIP
(they come from their own files). :func:`convert_regionspot_state_dict` maps the former to the
latter and checks every shape against the configured model, so a checkpoint of another variant
fails with a message that names both.

Weight files are read with ``torch.load(weights_only=True)`` (no code in the file runs; detectron2's
model-zoo ``.pkl`` files stay plain pickles) by :func:`read_weights_file`, which turns every way a
file can be unusable (missing, empty, cut short, a web page or text saved under the name, another
model's weights) into one :class:`WeightsFileError` naming the file, the config key and what the
file should be.

Loaders built on these: :func:`load_head_weights` (a RegionSpot checkpoint's fusion module into any
model), :func:`load_detector_weights` (a detector's checkpoint, checked by
:func:`check_weights_file`, then loaded by detectron2's ``DetectionCheckpointer``) and
:func:`accept_released_checkpoints` (``load_state_dict`` reads the released layout).
``regionspot.checkpoint.RegionSpotCheckpointer`` builds on this module too.
"""
import logging
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .fusion import RegionSpotFusion
from .pairs import frozen_pair_mismatch

logger = logging.getLogger(__name__)

__all__ = [
    "FUSION_PREFIXES",
    "REGIONSPOT_CHECKPOINT",
    "DETECTOR_CHECKPOINT",
    "WeightsFileError",
    "accept_released_checkpoints",
    "check_weights_file",
    "convert_regionspot_state_dict",
    "describe_weights",
    "fusion_weights_source",
    "load_detector_weights",
    "load_head_weights",
    "read_weights_file",
    "record_fusion_weights",
    "unwrap_state_dict",
    "wrong_weights_error",
]

FUSION_PREFIXES = ("to_clip.", "decoder.", "projector.")
_RELEASED_FROZEN = ("model.sam.", "model.clip_model.")

# What each config key's file should be (the end of every weights-file message).
REGIONSPOT_CHECKPOINT = (
    "a RegionSpot checkpoint: the authors' released RegionSpot-BB / -BL / -BL@336 file, or a model_final.pth "
    "written by train_net.py"
)
DETECTOR_CHECKPOINT = "the detector's detectron2 checkpoint (a .pth written by detectron2, or a model-zoo .pkl)"
_EXPECTED = {
    "MODEL.WEIGHTS": REGIONSPOT_CHECKPOINT,
    "MODEL.REGIONSPOT.HEAD.WEIGHTS": REGIONSPOT_CHECKPOINT,
    "MODEL.REGIONSPOT.DETECTOR.WEIGHTS": DETECTOR_CHECKPOINT,
}

# What torch.load / pickle.load raise on a file that is not (all of) a checkpoint. A zip cut short
# gives OSError or RuntimeError, a legacy file cut short struct.error or EOFError, text KeyError or
# UnpicklingError; a pickle naming a missing class AttributeError / ImportError.
_READ_ERRORS = (
    RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
    IndexError, TypeError, AttributeError, ImportError, struct.error,
)

# The weights of which model a set of keys looks like: (kind, description, prefixes that must all
# occur, config key the file belongs to). First match wins, so a RegionSpot checkpoint that also
# holds the frozen model.sam.* tensors is named as one.
_SIGNATURES: Tuple[Tuple[str, str, Tuple[Tuple[str, ...], ...], str], ...] = (
    ("regionspot", "a RegionSpot checkpoint (keys roi_heads.fusion.* / model.to_clip.*)",
     (("roi_heads.fusion.", "model.to_clip.", "model.decoder.layers.", "model.projector."),),
     "MODEL.WEIGHTS (or MODEL.REGIONSPOT.HEAD.WEIGHTS)"),
    ("regionspot", "a bare RegionSpot fusion state dict (keys to_clip.*, decoder.*, projector.*)",
     (("to_clip.",), ("projector.",)), "MODEL.REGIONSPOT.HEAD.WEIGHTS"),
    ("sam", "SAM weights (keys image_encoder.*, mask_decoder.*)",
     (("image_encoder.",), ("mask_decoder.", "prompt_encoder.")), "MODEL.REGIONSPOT.SAM.WEIGHTS"),
    ("clip", "OpenAI CLIP (keys visual.*, transformer.resblocks.*)",
     (("visual.",), ("transformer.resblocks.", "token_embedding.")), "MODEL.REGIONSPOT.CLIP.WEIGHTS"),
    ("detector", "a detectron2 detector checkpoint (keys backbone.*, roi_heads.box_predictor.*)",
     (("backbone.", "proposal_generator.", "roi_heads.box_predictor.", "roi_heads.box_head."),),
     "MODEL.REGIONSPOT.DETECTOR.WEIGHTS (RegionSpotRelabel), or MODEL.WEIGHTS of a GeneralizedRCNN recipe "
     "with the RegionSpot checkpoint in MODEL.REGIONSPOT.HEAD.WEIGHTS (projects/RegionSpot)"),
    ("detector", "a Caffe2 / Detectron model-zoo pickle (keys res2_*, conv1_w)",
     (("res2_", "conv1_w", "res_conv1_", "fc1000_"),), "MODEL.WEIGHTS of a detectron2 detector"),
    ("backbone", "a torchvision-style image classifier (keys layer1.*, fc.*)",
     (("layer1.",), ("fc.", "conv1.")), "a backbone's weights (not RegionSpot)"),
)


class WeightsFileError(ValueError):
    """
    A weights file that cannot serve its config key: unreadable, not a checkpoint, or another
    model's weights. The message names the file, the key and what the file should be.

    Attributes:
        path: the file.
        config_key: the config key that named it (e.g. ``MODEL.REGIONSPOT.SAM.WEIGHTS``).
    """

    def __init__(self, message: str, path: str = "", config_key: str = ""):
        super().__init__(message)
        self.path = path
        self.config_key = config_key


def describe_weights(keys: Iterable[str]) -> Optional[Tuple[str, str, str]]:
    """
    Which model's weights a state dict's keys look like.

    Args:
        keys: the state dict's keys (a checkpoint's ``model`` dict, or the file itself).

    Returns:
        ``(kind, description, config key the file belongs to)`` with ``kind`` one of
        ``"regionspot"``, ``"sam"``, ``"clip"``, ``"detector"``, ``"backbone"``; None when no
        known model matches.
    """
    keys = [k for k in keys if isinstance(k, str)]
    for kind, description, groups, home in _SIGNATURES:
        if all(any(k.startswith(group) for k in keys) for group in groups):
            return kind, description, home
    return None


def _key_examples(keys: Iterable[str], count: int = 4) -> str:
    """A few keys of distinct modules (the first key under each two-part prefix), and how many there are."""
    keys = [str(k) for k in keys]
    picked: List[str] = []
    seen = set()
    for k in keys:
        head = ".".join(k.split(".")[:2])
        if head not in seen:
            seen.add(head)
            picked.append(k)
        if len(picked) == count:
            break
    more = ", ..." if len(keys) > len(picked) else ""
    return f"{', '.join(repr(k) for k in picked)}{more} ({len(keys)} keys)" if keys else "no keys at all"


def _wrong_model_sentence(keys: Iterable[str], where: str = "") -> str:
    """' It looks like <model>; that file belongs in <key>.' for known models, '' otherwise."""
    found = describe_weights(keys)
    if found is None:
        return ""
    _, description, home = found
    if where and home.startswith(where):
        return f" It looks like {description}."
    return f" It looks like {description}; such a file belongs in {home}."


def _head(path: str, size: int = 1024) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _is_torchscript(path: str) -> bool:
    """TorchScript archives (OpenAI's CLIP files) are zips with ``<name>/code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names)


def _torchscript_keys(path: str) -> List[str]:
    """The state-dict keys of a TorchScript archive (empty when it cannot be loaded)."""
    try:
        return list(torch.jit.load(path, map_location="cpu").state_dict())
    except RuntimeError:
        return []


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable >= 0.95 * len(head)


def _unreadable_reason(path: str, error: BaseException) -> str:
    """What a file that torch.load / pickle.load could not read is, judged from its first bytes."""
    size = os.path.getsize(path)
    head = _head(path)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch colours parts of its messages
    detail = f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
    # A readable file (zip or pickle) with Python objects besides tensors (torch names the first).
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe and head.startswith((b"PK\x03\x04", b"\x80")):
        return (
            f"holds Python objects besides tensors (e.g. {unsafe.group(1)}), which torch.load(weights_only=True) "
            "refuses to unpickle because unpickling them can run code. If you trust the file, re-save its state dict "
            "alone (torch.load(path, weights_only=False), then torch.save of its tensors to a new file)"
        )
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (
                f"is a zip archive (the format of torch.save) cut short or corrupt ({size} bytes): an interrupted "
                "download or copy? Download or copy it again"
            )
        if _is_torchscript(path):
            return (
                "is a TorchScript archive (the format of OpenAI's CLIP files, e.g. ViT-B-16.pt), not a state dict."
                + _wrong_model_sentence(_torchscript_keys(path))
            )
        return f"is a torch.save archive that cannot be read ({detail}): a corrupt file? Download or copy it again"
    stripped = head.lstrip()
    lower = stripped[:200].lower()
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")) or b"<html" in lower:
        return (
            "is an HTML page, not a checkpoint: the download saved a web page (a login, error or 'virus scan' "
            "page) instead of the file. Download the file itself (e.g. with the direct link)"
        )
    if stripped.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the file itself: run `git lfs pull` or download the file"
    if head.startswith(b"\x80"):  # a pickle (detectron2 .pkl, torch.save's legacy format)
        return (
            f"is a pickle (legacy torch.save or .pkl format) cut short, corrupt or not a checkpoint ({size} bytes; "
            f"{detail}): an interrupted download or copy? Download or copy it again"
        )
    if _looks_like_text(head):
        first = stripped.decode("utf-8", "replace").splitlines()[0][:60] if stripped else ""
        return f"is a text file, not a checkpoint (it starts with {first!r})"
    return f"is not a PyTorch checkpoint (it starts with the bytes {head[:8]!r}; {detail})"


def _check_file(path: str, config_key: str, expected: str) -> None:
    """A missing or empty file, named with its key (before torch gives its own, less helpful error)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_key}={path!r} does not exist. {config_key} must be {expected}.")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(
            f"{config_key}={path!r} is empty (0 bytes): an interrupted download or copy? {config_key} must be "
            f"{expected}; download or copy it again.",
            path, config_key,
        )


def _unreadable(path: str, config_key: str, expected: str, error: BaseException) -> WeightsFileError:
    return WeightsFileError(
        f"{config_key}={path!r} {_unreadable_reason(path, error).rstrip('.')}. {config_key} must be {expected}.",
        path, config_key,
    )


def read_weights_file(path: str, config_key: str, expected: str, *, allow_torchscript: bool = False) -> Any:
    """
    Read a weights file safely, with one clear error for every way it can be unusable.

    ``.pkl`` files are read as detectron2 reads its model zoo's (a plain pickle, latin1); others
    with ``torch.load(weights_only=True)``, so no code stored in the file runs.

    Args:
        path: a local file.
        config_key: the config key that named it, for the messages.
        expected: what the file should be, e.g. "SAM's official state dict (sam_vit_b_01ec64.pth)".
        allow_torchscript: return the state dict of a TorchScript archive (OpenAI's CLIP files)
            instead of refusing it.

    Returns:
        what the file holds (a TorchScript archive: its state dict).

    Raises:
        FileNotFoundError: no such file.
        WeightsFileError: empty, cut short, not a checkpoint (HTML page, text, ...), or a
            TorchScript archive where a state dict is expected.
    """
    _check_file(path, config_key, expected)
    if allow_torchscript and _is_torchscript(path):
        try:
            return torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError as e:
            raise _unreadable(path, config_key, expected, e) from e
    try:
        if path.endswith(".pkl"):
            with PathManager.open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        return torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as e:
        raise _unreadable(path, config_key, expected, e) from e


def wrong_weights_error(
    path: str, config_key: str, expected: str, problem: str, keys: Iterable[str]
) -> WeightsFileError:
    """
    The error for a readable file that is not what ``config_key`` needs: names the file and the
    key, says which model the file seems to be (and where such a file belongs), lists a few of its
    keys and says what the file should be.

    Args:
        path: the file.
        config_key: the config key that named it.
        expected: what the file should be.
        problem: what is wrong, e.g. "holds no SAM weights (no image_encoder.* keys)".
        keys: the keys of the state dict the file holds.
    """
    keys = [k for k in keys if isinstance(k, str)]
    return WeightsFileError(
        f"{config_key}={path!r} {problem}.{_wrong_model_sentence(keys, config_key)} The file holds "
        f"{_key_examples(keys)}. {config_key} must be {expected}.",
        path, config_key,
    )


def unwrap_state_dict(loaded: Any) -> Any:
    """The state dict inside a checkpoint (``{"model": ...}`` or ``{"state_dict": ...}``), or the object itself."""
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), Mapping):
                return loaded[key]
    return loaded


# ---------------------------------------------------------------------------------------------
# Where the fusion module's weights came from (None: nothing loaded them, they are random)
_SOURCE_ATTR = "_regionspot_weights_file"


def _find_fusion(model) -> Tuple[Optional[str], Optional[torch.nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, RegionSpotFusion):
            return (name + "." if name else ""), module
    return None, None


def record_fusion_weights(model, path: str) -> None:
    """Remember that the RegionSpot fusion module of ``model`` (or ``model`` itself) was loaded from ``path``."""
    _, fusion = _find_fusion(model)
    if fusion is not None:
        setattr(fusion, _SOURCE_ATTR, path)


def fusion_weights_source(model) -> Optional[str]:
    """The file the fusion module of ``model`` was loaded from by our loaders; None if none did."""
    _, fusion = _find_fusion(model)
    return None if fusion is None else getattr(fusion, _SOURCE_ATTR, None)


def _describe(shapes: Mapping[str, torch.Size], prefix: str) -> str:
    to_clip = shapes.get(prefix + "to_clip.weight")
    proj = shapes.get(prefix + "projector.weight")
    if to_clip is None or proj is None:
        return "an unknown variant"
    variants = {(768, 512): "RegionSpot-BB (CLIP ViT-B/16)", (1024, 768): "RegionSpot-BL (CLIP ViT-L/14)"}
    dims = (int(to_clip[0]), int(proj[0]))
    name = variants.get(dims, "a custom variant")
    return f"{name}: CLIP width {dims[0]}, text width {dims[1]}, SAM token width {int(to_clip[1])}"


def convert_regionspot_state_dict(
    state_dict: Dict[str, torch.Tensor],
    model_shapes: Mapping[str, torch.Size],
    fusion_prefix: str = "roi_heads.fusion.",
) -> Dict[str, torch.Tensor]:
    """
    Map a released RegionSpot state dict to our key layout and validate it.

    Args:
        state_dict: a checkpoint's ``model`` dict, in the released layout or ours; changed in place.
        model_shapes: parameter name -> shape of the model being loaded.
        fusion_prefix: where the model keeps its :class:`RegionSpotFusion`.

    Returns:
        ``state_dict`` with ``model.to_clip.*`` etc. renamed to ``<fusion_prefix>to_clip.*`` and the
        released frozen SAM / CLIP keys removed.

    Raises:
        ValueError: a fusion-module tensor has a shape other than the model's (another variant).
    """
    frozen = [k for k in state_dict if k.startswith(_RELEASED_FROZEN)]
    for k in frozen:
        del state_dict[k]
    if frozen:
        logger.info(
            f"Ignoring {len(frozen)} frozen SAM/CLIP tensors of the checkpoint; they are read from "
            "MODEL.REGIONSPOT.SAM.WEIGHTS and MODEL.REGIONSPOT.CLIP.WEIGHTS."
        )
    renamed = 0
    for k in list(state_dict):
        if k.startswith("model.") and k[len("model."):].startswith(FUSION_PREFIXES):
            state_dict[fusion_prefix + k[len("model."):]] = state_dict.pop(k)
            renamed += 1
    if renamed:
        logger.info(f"Converted {renamed} tensors of a released RegionSpot checkpoint to '{fusion_prefix}*'.")

    bad = [
        (k, tuple(v.shape), tuple(model_shapes[k]))
        for k, v in state_dict.items()
        if k.startswith(fusion_prefix) and k in model_shapes and tuple(v.shape) != tuple(model_shapes[k])
    ]
    if bad:
        ckpt_shapes = {k: v.shape for k, v in state_dict.items()}
        k, got, want = bad[0]
        raise ValueError(
            f"The checkpoint does not fit the configured model: {k} is {list(got)} in the checkpoint "
            f"but {list(want)} in the model ({len(bad)} tensors differ). The checkpoint is "
            f"{_describe(ckpt_shapes, fusion_prefix)}; the config builds "
            f"{_describe(model_shapes, fusion_prefix)}. Set MODEL.REGIONSPOT.CLIP.TYPE (and "
            "CLIP.INPUT_SIZE) to the variant the checkpoint was trained for, or use the config of "
            "that variant."
        )
    return state_dict


def _find_fusion_prefix(model) -> Optional[str]:
    return _find_fusion(model)[0]


def accept_released_checkpoints(model):
    """
    Let ``model.load_state_dict`` (and so the stock ``DetectionCheckpointer``) read released
    RegionSpot checkpoints: keys are converted and validated by :func:`convert_regionspot_state_dict`
    when loading starts. Register on the root module (children only see their own keys).
    """

    def convert(module, state_dict, prefix, *args):
        fusion_prefix = _find_fusion_prefix(module)
        if fusion_prefix is None:
            return
        before = set(state_dict)
        shapes = {prefix + k: v.shape for k, v in module.state_dict().items()}
        convert_regionspot_state_dict(state_dict, shapes, prefix + fusion_prefix)
        module._released_keys_consumed = before - set(state_dict)

    def quiet(module, incompatible_keys):
        consumed = getattr(module, "_released_keys_consumed", set())
        incompatible_keys.unexpected_keys[:] = [k for k in incompatible_keys.unexpected_keys if k not in consumed]

    model.register_load_state_dict_pre_hook(convert)
    model.register_load_state_dict_post_hook(quiet)
    return model


# ---------------------------------------------------------------------------------------------
# RegionSpot weights into any model
def partial_fusion_weights_error(path: str, key: str, missing, total: int, expected: str) -> "WeightsFileError":
    """The error for a file holding only some of the fusion module's ``total`` tensors (``missing`` named)."""
    shown = ", ".join(repr(k) for k in missing[:8]) + (", ..." if len(missing) > 8 else "")
    return WeightsFileError(
        f"{key}={path!r} holds only part of the RegionSpot fusion weights: {len(missing)} of the "
        f"{total} tensors of the fusion module are missing ({shown}); those would stay random. {key} must "
        f"be {expected}, with every tensor of the fusion module (if the file was cut or edited, use the original).",
        path, key,
    )


def load_head_weights(model: nn.Module, path: str) -> List[str]:
    """
    Load a RegionSpot checkpoint's fusion module into the ``RegionSpotFusion`` of ``model``.

    For models whose ``MODEL.WEIGHTS`` is another file (a ``GeneralizedRCNN`` loads the detector's
    backbone and RPN from it): call this after the checkpointer, with
    ``MODEL.REGIONSPOT.HEAD.WEIGHTS``. Reads our layout (``roi_heads.fusion.*``), the released one
    (``model.to_clip.*`` ..., frozen SAM/CLIP tensors ignored) and a bare fusion state dict; shapes are
    checked, so another variant's checkpoint fails with a message naming both. Other keys of the file
    are ignored. Files are read with ``torch.load(weights_only=True)`` (``.pkl``: a plain pickle, as
    detectron2 reads them).

    Returns:
        the names (inside the fusion module) of the loaded tensors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no path, or not one fusion module in ``model``.
        WeightsFileError: (a ValueError) the file is unreadable (empty, cut
            short, not a checkpoint), holds no or only part of the fusion weights (e.g. SAM's, CLIP's
            or a detector's file), or those of another variant.
    """
    key = "MODEL.REGIONSPOT.HEAD.WEIGHTS"
    fusions = [(n, m) for n, m in model.named_modules() if isinstance(m, RegionSpotFusion)]
    if len(fusions) != 1:
        raise ValueError(f"load_head_weights: the model has {len(fusions)} RegionSpotFusion modules; expected one.")
    _, fusion = fusions[0]
    if not path:
        raise ValueError(f"load_head_weights: no path ({key} is empty).")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key}={path!r} does not exist. Give the path of {REGIONSPOT_CHECKPOINT}."
        )
    local = PathManager.get_local_path(path)  # a URL is downloaded (and cached) first
    loaded = read_weights_file(local, key, REGIONSPOT_CHECKPOINT)
    recorded_pair = loaded.get("frozen_pair") if isinstance(loaded, dict) else None
    ckpt = unwrap_state_dict(loaded)
    if not isinstance(ckpt, dict):
        raise WeightsFileError(
            f"{key}={path!r} holds a {type(ckpt).__name__}, not a state dict. {key} must be {REGIONSPOT_CHECKPOINT}.",
            path, key,
        )
    held = [k for k in ckpt if isinstance(k, str)]
    state = {k: torch.as_tensor(v) for k, v in ckpt.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    prefix = "roi_heads.fusion."
    # A bare fusion state dict: give it our prefix.
    state = {(prefix + k if k.startswith(FUSION_PREFIXES) else k): v for k, v in state.items()}
    shapes = {prefix + k: v.shape for k, v in fusion.state_dict().items()}
    try:
        convert_regionspot_state_dict(state, shapes, prefix)
    except ValueError as e:
        raise WeightsFileError(f"{key}={path!r}: {e}", path, key) from e
    fusion_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not fusion_state:
        raise wrong_weights_error(
            path, key, REGIONSPOT_CHECKPOINT,
            "holds no RegionSpot fusion weights (no 'roi_heads.fusion.*', 'model.to_clip.*', ... keys)", held,
        )
    missing = [k for k in fusion.state_dict() if k not in fusion_state]
    if missing:
        raise partial_fusion_weights_error(path, key, missing, len(shapes), REGIONSPOT_CHECKPOINT)
    mismatch = frozen_pair_mismatch(model, recorded_pair, path, key)
    if mismatch:
        raise WeightsFileError(mismatch, path, key)
    fusion.load_state_dict(fusion_state, strict=True)
    record_fusion_weights(fusion, path)
    logger.info(f"Loaded {len(fusion_state)} RegionSpot fusion tensors from {path}.")
    return sorted(fusion_state)


# ---------------------------------------------------------------------------------------------
# A detector's weights
def _strip_query(path: str) -> Tuple[str, bool]:
    """``path`` without its URL query, and whether the query asked for detectron2's matching heuristics."""
    parsed = urlparse(path)
    heuristics = parse_qs(parsed.query).get("matching_heuristics") == ["True"]
    return parsed._replace(query="").geturl(), heuristics


def check_weights_file(
    path: str, model: nn.Module, config_key: str = "MODEL.REGIONSPOT.DETECTOR.WEIGHTS",
    expected: str = DETECTOR_CHECKPOINT,
) -> None:
    """
    Check that a checkpoint ``DetectionCheckpointer`` will load into ``model`` (a model without a
    RegionSpot fusion module, e.g. a detector) is usable, with one clear error otherwise.

    The file is read as ``DetectionCheckpointer`` reads it (``.pkl``: a plain pickle, detectron2's or
    Caffe2's model-zoo layout; other files: ``torch.load(weights_only=True)``) and refused when it is
    missing, empty, unreadable (cut short, an HTML page or text saved under the name), not a dict of
    tensors, or holds none of the model's tensor names (nothing would be loaded: another model's
    file). Files loaded by name-matching heuristics (Caffe2 / pycls model-zoo files) are not
    compared by name.

    Args:
        path: a local file or a URL (downloaded and cached by detectron2's ``PathManager``).
        model: the model the file is for.
        config_key: the config key that named the file, for the messages.
        expected: what the file should be, for the messages.

    Raises:
        FileNotFoundError: no such file.
        WeightsFileError: any other way the file is unusable; the message names the file and the key.
    """
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"{config_key}={path!r} does not exist. Give the path of {expected}.")
    path, heuristics = _strip_query(path)
    local = PathManager.get_local_path(path)
    loaded = read_weights_file(local, config_key, expected)
    if local.endswith((".pkl", ".pyth")) and isinstance(loaded, Mapping):
        # detectron2's model zoo keeps {"model", "__author__"}; Caffe2's and pycls' files are matched by heuristics.
        heuristics = heuristics or not ("model" in loaded and "__author__" in loaded)
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(
            f"{config_key}={local!r} holds a {type(loaded).__name__}, not a checkpoint (a dict of tensors). "
            f"{config_key} must be {expected}.",
            local, config_key,
        )
    state = loaded.get("model", loaded)
    if not isinstance(state, dict):
        raise WeightsFileError(
            f"{config_key}={path!r} holds no state dict (its 'model' entry is a {type(state).__name__}). {config_key} "
            f"must be {expected}.",
            path, config_key,
        )
    held = list(state)
    names = [k for k in held if isinstance(k, str)]
    if names and all(k.startswith("module.") for k in names):  # a (Distributed)DataParallel model's
        names = [k[len("module."):] for k in names]
    model_keys = list(model.state_dict())
    if model_keys and not heuristics and not set(names) & set(model_keys):
        raise wrong_weights_error(
            path, config_key, expected,
            f"holds none of the {type(model).__name__}'s tensors (it has {_key_examples(model_keys)}), so nothing "
            "would be loaded",
            held,
        )


def load_detector_weights(
    model: nn.Module, path: str, config_key: str = "MODEL.REGIONSPOT.DETECTOR.WEIGHTS",
    expected: str = DETECTOR_CHECKPOINT,
) -> Dict[str, Any]:
    """
    Load a detector's checkpoint into ``model`` with detectron2's ``DetectionCheckpointer`` (every
    layout it reads: its own ``.pth``, model-zoo ``.pkl``, Caffe2 pickles), after
    :func:`check_weights_file` refused an unusable file with a message naming it and ``config_key``.

    Returns:
        what ``DetectionCheckpointer.load`` returns (the checkpoint's other entries).
    """
    check_weights_file(path, model, config_key, expected)
    return DetectionCheckpointer(model).load(path)
