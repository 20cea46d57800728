"""
Checkpoint layouts: the authors' released RegionSpot checkpoints and ours.

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
file should be. :class:`RegionSpotCheckpointer` also refuses a ``MODEL.WEIGHTS`` that holds no (or
only part of the) RegionSpot fusion weights, and :func:`check_head_weights` an evaluation whose
fusion module nothing loaded.
"""
import logging
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _strip_prefix_if_present

logger = logging.getLogger(__name__)

__all__ = [
    "convert_regionspot_state_dict",
    "RegionSpotCheckpointer",
    "FUSION_PREFIXES",
    "accept_released_checkpoints",
    "WeightsFileError",
    "read_weights_file",
    "describe_weights",
    "wrong_weights_error",
    "unwrap_state_dict",
    "check_head_weights",
    "record_fusion_weights",
    "fusion_weights_source",
    "REGIONSPOT_CHECKPOINT",
    "DETECTOR_CHECKPOINT",
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
    "MODEL.REGIONSPOT.HEAD_WEIGHTS": REGIONSPOT_CHECKPOINT,
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
     "MODEL.WEIGHTS (or MODEL.REGIONSPOT.HEAD_WEIGHTS)"),
    ("regionspot", "a bare RegionSpot fusion state dict (keys to_clip.*, decoder.*, projector.*)",
     (("to_clip.",), ("projector.",)), "MODEL.REGIONSPOT.HEAD_WEIGHTS"),
    ("sam", "SAM weights (keys image_encoder.*, mask_decoder.*)",
     (("image_encoder.",), ("mask_decoder.", "prompt_encoder.")), "MODEL.REGIONSPOT.SAM.WEIGHTS"),
    ("clip", "OpenAI CLIP (keys visual.*, transformer.resblocks.*)",
     (("visual.",), ("transformer.resblocks.", "token_embedding.")), "MODEL.REGIONSPOT.CLIP.WEIGHTS"),
    ("detector", "a detectron2 detector checkpoint (keys backbone.*, roi_heads.box_predictor.*)",
     (("backbone.", "proposal_generator.", "roi_heads.box_predictor.", "roi_heads.box_head."),),
     "MODEL.REGIONSPOT.DETECTOR.WEIGHTS (RegionSpotRelabel), or MODEL.WEIGHTS of a GeneralizedRCNN recipe "
     "with the RegionSpot checkpoint in MODEL.REGIONSPOT.HEAD_WEIGHTS (projects/RegionSpot)"),
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
    from .modeling.fusion import RegionSpotFusion

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


def check_head_weights(cfg, model=None, *, resume: bool = False) -> None:
    """
    Refuse to evaluate a RegionSpot head whose fusion module nothing loads: with random fusion
    weights every score is noise, yet an AP would be printed as if it meant something.
    ``MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD`` lets tests and smoke runs evaluate the random module.

    Two calls, both cheap:

    * ``check_head_weights(cfg, resume=...)`` before the model is built (building encodes the
      vocabulary: minutes for LVIS on a CPU): refuses when nothing could load the module
      (``MODEL.WEIGHTS`` and ``HEAD_WEIGHTS`` empty, and no checkpoint to resume from);
    * ``check_head_weights(cfg, model)`` after the weights are loaded: ``RegionSpotCheckpointer`` and
      :func:`regionspot.modeling.load_head_weights` record what they loaded, so this also catches a
      detector's ``MODEL.WEIGHTS`` without ``HEAD_WEIGHTS`` (logs a warning when allowed).

    Args:
        cfg: the run's config.
        model: the built model with its weights loaded (any meta-architecture; one without a
            RegionSpot head passes); None for the check before building.
        resume: (without ``model``) the run resumes from ``OUTPUT_DIR``'s last checkpoint if there
            is one (``--resume``).

    Raises:
        ValueError: the fusion module has (or would have) random weights and ``ALLOW_RANDOM_HEAD``
            is off.
    """
    rs = cfg.MODEL.REGIONSPOT
    if model is None:
        resumable = resume and PathManager.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
        if rs.ALLOW_RANDOM_HEAD or cfg.MODEL.WEIGHTS or rs.HEAD_WEIGHTS or resumable:
            return  # the loaders check the files; the call with the model checks what they loaded
    else:
        _, fusion = _find_fusion(model)
        if fusion is None or getattr(fusion, _SOURCE_ATTR, None):
            return
        if rs.ALLOW_RANDOM_HEAD:
            logger.warning(
                "The RegionSpot fusion module has RANDOM weights (nothing loaded it; "
                "MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD is on): its results mean nothing (fine for tests and smoke runs "
                "only)."
            )
            return
    if rs.HEAD_WEIGHTS:
        why = (
            f"MODEL.REGIONSPOT.HEAD_WEIGHTS={rs.HEAD_WEIGHTS!r} is set but was not loaded into the model: call "
            "regionspot.modeling.load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD_WEIGHTS) before evaluating"
        )
    elif cfg.MODEL.WEIGHTS:
        why = (
            f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} did not load the fusion module (it holds no RegionSpot fusion "
            f"weights: a detector's file, loaded as the {type(model).__name__}'s own weights) and "
            f"MODEL.REGIONSPOT.HEAD_WEIGHTS is empty: set HEAD_WEIGHTS to {REGIONSPOT_CHECKPOINT}"
        )
    else:
        why = (
            f"MODEL.WEIGHTS is empty: set it to {REGIONSPOT_CHECKPOINT} (or, when MODEL.WEIGHTS is a detector's, "
            "as in the GeneralizedRCNN recipes, set MODEL.REGIONSPOT.HEAD_WEIGHTS to it)"
        )
    raise ValueError(
        "Refusing to evaluate a RegionSpot head whose fusion module has RANDOM weights (every score and the AP "
        f"would mean nothing). {why}. For tests and smoke runs only, MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD True "
        "evaluates the random module."
    )


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


class RegionSpotCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` that guards what it loads:

    * reads the released RegionSpot layout and refuses checkpoints of another variant (the stock
      one would skip mismatched tensors with a warning);
    * reads files with ``torch.load(weights_only=True)`` (detectron2's ``.pkl`` model-zoo files as
      the plain pickles they are) and turns an unreadable file (empty, cut short, an HTML page or
      text saved under the name) into one :class:`WeightsFileError` naming the file and the key;
    * refuses a file that holds none, or only part, of the model's RegionSpot fusion weights
      (detectron2 would only warn about missing keys and leave the module random), saying which
      model the file seems to be. A file without fusion weights is accepted only by a model that
      hosts the fusion module inside a detector whose other weights the file holds (a
      ``GeneralizedRCNN`` recipe: ``MODEL.WEIGHTS`` is the detector's, the fusion module comes from
      ``MODEL.REGIONSPOT.HEAD_WEIGHTS``; :func:`check_head_weights` then checks that it did);
    * for a model without a RegionSpot head (e.g. the detector of ``RegionSpotRelabel``), refuses a
      file that shares no tensor name with the model.

    What loaded the fusion module is recorded for :func:`check_head_weights`.

    Args:
        model, save_dir, checkpointables: as ``DetectionCheckpointer``.
        config_key: the config key whose file is loaded, for the messages (``MODEL.WEIGHTS``, or
            ``MODEL.REGIONSPOT.DETECTOR.WEIGHTS`` for a detector).
    """

    def __init__(self, model, save_dir: str = "", *, config_key: str = "MODEL.WEIGHTS", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.config_key = config_key
        self._resuming = False
        self._loading = ""

    def _source(self) -> Tuple[str, str]:
        """(name of the file's source, what the file should be) for the messages."""
        if self._resuming:
            return (
                "OUTPUT_DIR's last_checkpoint (resume)",
                "a checkpoint written by this training (delete OUTPUT_DIR/last_checkpoint to start over from "
                f"{self.config_key})",
            )
        return self.config_key, _EXPECTED.get(self.config_key, "a checkpoint of this model")

    def resume_or_load(self, path: str, *, resume: bool = True):
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path, *args, **kwargs):
        key, expected = self._source()
        if path and "://" not in path and not os.path.isfile(path):
            scratch = "; or leave it empty to train from scratch" if key == "MODEL.WEIGHTS" else ""
            raise FileNotFoundError(f"{key}={path!r} does not exist. Give the path of {expected}{scratch}.")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def _load_file(self, filename):
        key, expected = self._source()
        _check_file(filename, key, expected)
        try:
            return super()._load_file(filename)
        except WeightsFileError:
            raise
        except _READ_ERRORS as e:  # detectron2's .pkl / .pyth readers
            raise _unreadable(filename, key, expected, e) from e

    def _torch_load(self, f):
        # detectron2's reader of every file but .pkl / .pyth (fvcore's torch.load without weights_only).
        key, expected = self._source()
        loaded = read_weights_file(f, key, expected)
        if not isinstance(loaded, Mapping):
            raise WeightsFileError(
                f"{key}={f!r} holds a {type(loaded).__name__}, not a checkpoint (a dict of tensors). {key} must be "
                f"{expected}.",
                f, key,
            )
        return loaded

    def _load_model(self, checkpoint):
        key, expected = self._source()
        path = self._loading
        state = checkpoint.get("model")
        if not isinstance(state, dict):
            raise WeightsFileError(
                f"{key}={path!r} holds no state dict (its 'model' entry is a {type(state).__name__}). {key} must be "
                f"{expected}.",
                path, key,
            )
        # fvcore strips it too, but only after the fusion keys are checked below.
        _strip_prefix_if_present(state, "module.")
        held = list(state)
        model_shapes = {k: v.shape for k, v in self.model.state_dict().items()}
        fusion_prefix = _find_fusion_prefix(self.model)
        fusion_loaded = False
        if fusion_prefix is not None:
            try:
                convert_regionspot_state_dict(state, model_shapes, fusion_prefix)
            except ValueError as e:
                raise WeightsFileError(f"{key}={path!r}: {e}", path, key) from e
            fusion_loaded = self._check_fusion_weights(state, held, model_shapes, fusion_prefix, checkpoint)
        elif model_shapes and not checkpoint.get("matching_heuristics") and not any(k in model_shapes for k in state):
            raise wrong_weights_error(
                path, key, expected,
                f"holds none of the {type(self.model).__name__}'s tensors (it has {_key_examples(model_shapes)}), so "
                "nothing would be loaded",
                held,
            )
        incompatible = super()._load_model(checkpoint)
        if fusion_loaded:
            record_fusion_weights(self.model, path)
        return incompatible

    def _check_fusion_weights(self, state, held, model_shapes, prefix, checkpoint) -> bool:
        """
        True if ``state`` (converted to our layout) holds every fusion tensor; False for a detector's
        file loaded into a model hosting the fusion module (its weights must come from HEAD_WEIGHTS).

        Raises:
            WeightsFileError: part of the fusion tensors, or none in a file that is not the host's.
        """
        key, expected = self._source()
        path = self._loading
        fusion_keys = [k for k in model_shapes if k.startswith(prefix)]
        missing = [k for k in fusion_keys if k not in state]
        if not missing:
            return True
        if len(missing) < len(fusion_keys):
            shown = ", ".join(repr(k) for k in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise WeightsFileError(
                f"{key}={path!r} holds only part of the RegionSpot fusion weights: {len(missing)} of the "
                f"{len(fusion_keys)} tensors of the fusion module are missing ({shown}); those would stay random. "
                f"{key} must be {expected}, with every tensor of the fusion module (if the file was cut or edited, "
                "use the original).",
                path, key,
            )
        others = [k for k in model_shapes if not k.startswith(prefix)]
        if others and (checkpoint.get("matching_heuristics") or any(k in state for k in others)):
            # A GeneralizedRCNN recipe: the detector's file; the fusion module comes from HEAD_WEIGHTS.
            logger.warning(
                f"{key}={path!r} holds no RegionSpot fusion weights: loaded as the {type(self.model).__name__}'s "
                "own weights. The fusion module stays RANDOM until MODEL.REGIONSPOT.HEAD_WEIGHTS is loaded "
                "(regionspot.modeling.load_head_weights)."
            )
            return False
        released = ", ".join(repr("model." + k[len(prefix):]) for k in fusion_keys[:2])
        raise wrong_weights_error(
            path, key, expected,
            f"holds no RegionSpot fusion weights: none of the {len(fusion_keys)} tensors of the fusion module "
            f"({', '.join(repr(k) for k in fusion_keys[:2])}, ...; or {released}, ... in the authors' released "
            "layout), so the fusion module would stay RANDOM and every score would mean nothing",
            held,
        )


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
