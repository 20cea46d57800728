"""
The checkpointer of RegionSpot models and the check that an evaluated head has trained weights.

:class:`RegionSpotCheckpointer` (detectron2's ``DetectionCheckpointer``) reads our checkpoints and
the authors' released ones, and refuses a ``MODEL.WEIGHTS`` that holds no (or only part of the)
RegionSpot fusion weights; :func:`check_head_weights` refuses an evaluation whose fusion module
nothing loaded. Reading weight files and converting the released layout live in
:mod:`regionspot.modeling.weights`; their names are re-exported here (``WeightsFileError``,
``read_weights_file``, ``convert_regionspot_state_dict``, ...).
"""
import logging
import os
from typing import Mapping, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _strip_prefix_if_present

from .modeling.model_registry import check_frozen_pair, find_regionspot_head, frozen_pair
from .modeling.weights import (  # noqa: F401  (re-exported: the names' former home)
    DETECTOR_CHECKPOINT,
    FUSION_PREFIXES,
    REGIONSPOT_CHECKPOINT,
    WeightsFileError,
    _EXPECTED,
    _READ_ERRORS,
    _SOURCE_ATTR,
    _check_file,
    _find_fusion,
    _find_fusion_prefix,
    _key_examples,
    _unreadable,
    accept_released_checkpoints,
    convert_regionspot_state_dict,
    describe_weights,
    fusion_weights_source,
    partial_fusion_weights_error,
    read_weights_file,
    record_fusion_weights,
    unwrap_state_dict,
    wrong_weights_error,
)

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


def check_head_weights(cfg, model=None, *, resume: bool = False) -> None:
    """
    Refuse to evaluate a RegionSpot head whose fusion module nothing loads: with random fusion
    weights every score is noise, yet an AP would be printed as if it meant something.
    ``MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM`` lets tests and smoke runs evaluate the random module.

    Two calls, both cheap:

    * ``check_head_weights(cfg, resume=...)`` before the model is built (building encodes the
      vocabulary: minutes for LVIS on a CPU): refuses when nothing could load the module
      (``MODEL.WEIGHTS`` and ``HEAD.WEIGHTS`` empty, and no checkpoint to resume from);
    * ``check_head_weights(cfg, model)`` after the weights are loaded: ``RegionSpotCheckpointer`` and
      :func:`regionspot.modeling.load_head_weights` record what they loaded, so this also catches a
      detector's ``MODEL.WEIGHTS`` without ``HEAD.WEIGHTS`` (logs a warning when allowed).

    Args:
        cfg: the run's config.
        model: the built model with its weights loaded (any meta-architecture; one without a
            RegionSpot head passes); None for the check before building.
        resume: (without ``model``) the run resumes from ``OUTPUT_DIR``'s last checkpoint if there
            is one (``--resume``).

    Raises:
        ValueError: the fusion module has (or would have) random weights and ``HEAD.ALLOW_RANDOM``
            is off.
    """
    rs = cfg.MODEL.REGIONSPOT
    if model is None:
        resumable = resume and PathManager.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
        if rs.HEAD.ALLOW_RANDOM or cfg.MODEL.WEIGHTS or rs.HEAD.WEIGHTS or resumable:
            return  # the loaders check the files; the call with the model checks what they loaded
    else:
        _, fusion = _find_fusion(model)
        if fusion is None or getattr(fusion, _SOURCE_ATTR, None):
            return
        if rs.HEAD.ALLOW_RANDOM:
            logger.warning(
                "The RegionSpot fusion module has RANDOM weights (nothing loaded it; "
                "MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM is on): its results mean nothing (fine for tests and smoke runs "
                "only)."
            )
            return
    if rs.HEAD.WEIGHTS:
        why = (
            f"MODEL.REGIONSPOT.HEAD.WEIGHTS={rs.HEAD.WEIGHTS!r} is set but was not loaded into the model: call "
            "regionspot.modeling.load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS) before evaluating"
        )
    elif cfg.MODEL.WEIGHTS:
        why = (
            f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} did not load the fusion module (it holds no RegionSpot fusion "
            f"weights: a detector's file, loaded as the {type(model).__name__}'s own weights) and "
            f"MODEL.REGIONSPOT.HEAD.WEIGHTS is empty: set HEAD.WEIGHTS to {REGIONSPOT_CHECKPOINT}"
        )
    else:
        why = (
            f"MODEL.WEIGHTS is empty: set it to {REGIONSPOT_CHECKPOINT} (or, when MODEL.WEIGHTS is a detector's, "
            "as in the GeneralizedRCNN recipes, set MODEL.REGIONSPOT.HEAD.WEIGHTS to it)"
        )
    raise ValueError(
        "Refusing to evaluate a RegionSpot head whose fusion module has RANDOM weights (every score and the AP "
        f"would mean nothing). {why}. For tests and smoke runs only, MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM True "
        "evaluates the random module."
    )


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
      ``MODEL.REGIONSPOT.HEAD.WEIGHTS``; :func:`check_head_weights` then checks that it did);
    * for a model without a RegionSpot head (e.g. the detector of ``RegionSpotRelabel``), refuses a
      file that shares no tensor name with the model.

    What loaded the fusion module is recorded for :func:`check_head_weights`. Saved checkpoints record
    which localizer and vision-language model the head holds (``frozen_pair``); loading fusion weights
    into a head with another pair is refused, naming both (files without the record were trained with
    SAM + OpenAI CLIP).

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

    def save(self, name: str, **kwargs) -> None:
        head = find_regionspot_head(self.model)
        if head is not None:
            kwargs.setdefault("frozen_pair", frozen_pair(head))
        return super().save(name, **kwargs)

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
            if fusion_loaded:
                check_frozen_pair(self.model, checkpoint.get("frozen_pair"), path, key)
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
        file loaded into a model hosting the fusion module (its weights must come from HEAD.WEIGHTS).

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
            raise partial_fusion_weights_error(path, key, missing, len(fusion_keys), expected)
        others = [k for k in model_shapes if not k.startswith(prefix)]
        if others and (checkpoint.get("matching_heuristics") or any(k in state for k in others)):
            # A GeneralizedRCNN recipe: the detector's file; the fusion module comes from HEAD.WEIGHTS.
            logger.warning(
                f"{key}={path!r} holds no RegionSpot fusion weights: loaded as the {type(self.model).__name__}'s "
                "own weights. The fusion module stays RANDOM until MODEL.REGIONSPOT.HEAD.WEIGHTS is loaded "
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
