"""
Cache of the frozen models' outputs for training: SAM region tokens of every GT box and the CLIP
feature map of every training image, for a FIXED SET OF AUGMENTED VIEWS.

Why views: SAM tokens depend on the image and the box together, so tokens of the un-augmented image
cannot be paired with an augmented CLIP view (the reference implementation does that and misaligns
them). Each view here is a deterministic detectron2 transform (identity, horizontal flip, a fixed
shortest-edge resize, ...) applied to the image AND its boxes, exactly as the online training mapper
applies its random augmentation; tokens are computed on the transformed image with the transformed
boxes. Training then draws one of the cached views at random per image.

Written by ``tools/extract_features.py`` (:mod:`regionspot.engine.feature_extraction`); read by
:func:`build_cached_train_loader` (used by ``train_net.py`` when ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR``
is set), which never decodes an image.

Layout::

    <root>/manifest.json                       settings the cache was made with (see below)
    <root>/<dataset>/<view>/<image key>.pt     one record per image and view

``<image key>`` is the dataset dict's ``image_id``, percent-escaped (``urllib.parse.quote``) so any id
maps to one file name. Each record is a plain ``torch.save`` dict (``torch.load(weights_only=True)``
reads it) written atomically (temporary file + ``os.replace``) holding ``region_tokens`` [N, token_dim]
fp16, ``clip_features`` [L, D_v] fp16, ``gt_boxes`` [N, 4] fp32 (XYXY in the view's pixels),
``gt_classes`` [N] int64 (contiguous ids), ``image_size`` (h, w) of the view, ``original_size``,
``view``, ``dataset``, ``image_id``, ``annotations_sha256`` (digest of the dataset dict's annotations:
a record is refused when the dataset's annotations changed since extraction) and ``sha256``, a digest
of all of the above, checked on every load: a truncated or altered file raises
:class:`FeatureCacheError` naming the file instead of giving wrong features. Images without boxes are
stored with N = 0.

``manifest.json`` records the format version, the dtype, the datasets (number of images, views),
the view definitions, ``FROZEN.PRECISION`` (features made under fp16/bf16 autocast are not those of
fp32) and, for SAM and CLIP, the TYPE, the weights fingerprint, CLIP's INPUT_SIZE and the feature
dimensions.

This module stores and compares those settings; it builds no model. What they are for a config or a
built model (the fingerprints of the frozen weights: a weights file's SHA-256, or the seed and tensor
digest of seeded random weights) is computed by :mod:`regionspot.engine.fingerprints`
(:func:`~regionspot.engine.fingerprints.settings_from_cfg`,
:func:`~regionspot.engine.fingerprints.check_feature_cache`).
A cache made with other settings is "stale": :meth:`FeatureCache.check` raises
:class:`StaleFeatureCacheError` naming the mismatching setting; re-run ``tools/extract_features.py``
into a new directory. What the check cannot see is a change of the feature code itself (SAM token
definition, CLIP preprocessing): bump :data:`FORMAT_VERSION` with such a change.
"""
import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

from .atomic_files import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CachedView",
    "VIEWS",
    "get_view",
    "FeatureCache",
    "FeatureCacheError",
    "StaleFeatureCacheError",
    "CachedFeatureMapper",
    "build_cached_train_loader",
    "file_sha256",
    "view_annotations",
    "annotations_digest",
    "image_key",
]

# Bump when what a record means changes (token definition, CLIP preprocessing, record fields).
FORMAT_VERSION = 1
FORMAT_NAME = "regionspot-feature-cache"
MANIFEST_NAME = "manifest.json"
RECORD_SUFFIX = ".pt"
FEATURE_DTYPE = torch.float16
_RERUN = "Re-run tools/extract_features.py with the current config into a NEW --output directory"


class FeatureCacheError(RuntimeError):
    """A cache file is missing, unreadable, corrupt or does not belong where it is."""


class StaleFeatureCacheError(ValueError):
    """The cache was made with other settings (frozen models, their weights, CLIP input size, ...)."""


# -------------------------------------------------------------------------------------------------
# Views
@dataclass(frozen=True)
class CachedView:
    """
    A deterministic augmentation: optional shortest-edge resize (detectron2's ``ResizeShortestEdge``
    with one length, bilinear), then an optional horizontal flip, applied to the image and its boxes.
    """

    name: str
    short_edge: Optional[int] = None
    max_size: Optional[int] = None
    hflip: bool = False

    def definition(self) -> dict:
        return {"short_edge": self.short_edge, "max_size": self.max_size, "hflip": self.hflip, "interp": "bilinear"}

    def get_transform(self, image_shape: Tuple[int, int]) -> T.TransformList:
        """The view's transforms for an image of ``image_shape`` (h, w)."""
        h, w = int(image_shape[0]), int(image_shape[1])
        transforms = []
        if self.short_edge is not None:
            newh, neww = T.ResizeShortestEdge.get_output_shape(h, w, self.short_edge, self.max_size or 10**9)
            transforms.append(T.ResizeTransform(h, w, newh, neww, Image.BILINEAR))
            h, w = newh, neww
        if self.hflip:
            transforms.append(T.HFlipTransform(w))
        return T.TransformList(transforms)


VIEWS: Dict[str, CachedView] = {
    "identity": CachedView("identity"),
    "hflip": CachedView("hflip", hflip=True),
}
_RESIZE_VIEW = re.compile(r"^short(\d+)(?:max(\d+))?(_hflip)?$")


def get_view(name: str) -> CachedView:
    """
    A view by name: ``identity``, ``hflip``, or ``short<S>[max<M>][_hflip]``
    (shortest edge resized to S, longest side at most M, default 1333; e.g. ``short640_hflip``).
    """
    name = str(name).strip()
    if name in VIEWS:
        return VIEWS[name]
    m = _RESIZE_VIEW.match(name)
    if m:
        return CachedView(name, short_edge=int(m.group(1)), max_size=int(m.group(2) or 1333), hflip=bool(m.group(3)))
    raise ValueError(
        f"Unknown feature-cache view {name!r}; use one of {sorted(VIEWS)} or 'short<S>[max<M>][_hflip]' "
        "(e.g. short640, short800max1333_hflip)."
    )


# -------------------------------------------------------------------------------------------------
# Records
def image_key(image_id) -> str:
    """File stem of an image: its id, percent-escaped (injective; no path separators, no dot files)."""
    key = urllib.parse.quote(str(image_id), safe="")
    return "%2E" + key[1:] if key.startswith(".") else key


def _plain_id(image_id):
    return int(image_id) if isinstance(image_id, (np.integer, int)) and not isinstance(image_id, bool) else str(image_id)


def annotations_digest(annotations: Optional[Sequence[dict]]) -> str:
    """SHA-256 of the boxes, box modes, classes and crowd flags of a dataset dict's annotations."""
    rows = [
        [[float(v) for v in a["bbox"]], int(a["bbox_mode"]), int(a["category_id"]), int(a.get("iscrowd", 0))]
        for a in (annotations or [])
    ]
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


_TENSOR_FIELDS = ("region_tokens", "clip_features", "gt_boxes", "gt_classes")
_META_FIELDS = ("format_version", "dataset", "view", "image_id", "image_size", "original_size", "annotations_sha256")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (on the CPU, contiguous)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _record_digest(record: dict) -> str:
    h = hashlib.sha256()
    meta = {k: record.get(k) for k in _META_FIELDS}
    meta["image_size"] = list(meta["image_size"] or [])
    meta["original_size"] = list(meta["original_size"] or [])
    h.update(json.dumps(meta, sort_keys=True).encode("utf-8"))
    for k in _TENSOR_FIELDS:
        t = record[k]
        h.update(f"|{k}|{t.dtype}|{list(t.shape)}|".encode("utf-8"))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def view_annotations(dataset_dict: dict, transforms: T.TransformList, image_shape: Tuple[int, int]) -> Instances:
    """
    The GT of a dataset dict in a view, exactly as detectron2's ``DatasetMapper`` (the online
    training mapper) makes it: crowd boxes dropped, boxes transformed and clipped, empty boxes removed.
    """
    annos = []
    for obj in dataset_dict.get("annotations", []):
        if obj.get("iscrowd", 0) != 0:
            continue
        obj = {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")}
        annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
    return utils.filter_empty_instances(utils.annotations_to_instances(annos, image_shape))


# -------------------------------------------------------------------------------------------------
# Weights files
_FILE_HASHES: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a whole file (memoised per path, size and mtime within the process)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


# Settings compared between a cache and the current config: (manifest path, what to call it).
_CFG_FIELDS = (
    (("format_version",), "the feature-cache format version"),
    (("dtype",), "the feature dtype"),
    (("sam", "type"), "MODEL.REGIONSPOT.SAM.TYPE"),
    (("sam", "weights_sha256"), "the SHA-256 of MODEL.REGIONSPOT.SAM.WEIGHTS (None: seeded random weights)"),
    (("sam", "random_init_seed"), "MODEL.REGIONSPOT.FROZEN.SEED (SAM's random weights)"),
    (("clip", "type"), "MODEL.REGIONSPOT.CLIP.TYPE"),
    (("clip", "weights_sha256"), "the SHA-256 of MODEL.REGIONSPOT.CLIP.WEIGHTS (None: seeded random weights)"),
    (("clip", "random_init_seed"), "MODEL.REGIONSPOT.FROZEN.SEED (CLIP's random weights)"),
    (("clip", "input_size"), "MODEL.REGIONSPOT.CLIP.INPUT_SIZE"),
    (("clip", "resize_antialias"), "MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS"),
    (("frozen_precision",), "MODEL.REGIONSPOT.FROZEN.PRECISION (None: a cache written before it was recorded)"),
)
_MODEL_FIELDS = (
    (("sam", "tensors_sha256"), "the fingerprint of SAM's weight tensors"),
    (("sam", "token_dim"), "SAM's token width"),
    (("clip", "tensors_sha256"), "the fingerprint of CLIP's weight tensors"),
    (("clip", "input_size"), "CLIP's input size (MODEL.REGIONSPOT.CLIP.INPUT_SIZE)"),
    (("clip", "num_tokens"), "the number of CLIP feature tokens"),
    (("clip", "width"), "CLIP's feature width"),
    (("frozen_precision",), "the frozen models' precision (MODEL.REGIONSPOT.FROZEN.PRECISION)"),
)


def _get(d: dict, path: Sequence[str]):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _has(d: dict, path: Sequence[str]) -> bool:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


# Values of settings recorded later, for caches written before them.
_RECORDED_LATER = {("clip", "resize_antialias"): False}


def _compare(root: str, cached: dict, current: dict, fields, what: str):
    for path, label in fields:
        a, b = _get(cached, path), _get(current, path)
        if a is None and path in _RECORDED_LATER:
            a = _RECORDED_LATER[path]
        if a != b:
            raise StaleFeatureCacheError(
                f"Feature cache {root} is stale: {label} is {a!r} in the cache but {b!r} in {what}. {_RERUN} "
                "(or delete the old one)."
            )


# -------------------------------------------------------------------------------------------------
# The cache
class FeatureCache:
    """A feature cache directory (see the module docstring for the layout and the checks)."""

    def __init__(self, root: str):
        if not root:
            raise ValueError("FeatureCache needs a directory (MODEL.REGIONSPOT.FEATURE_CACHE.DIR).")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self._manifest: Optional[dict] = None

    def __repr__(self):
        return f"FeatureCache({self.root!r})"

    # -- manifest ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return os.path.join(self.root, MANIFEST_NAME)

    def read_manifest(self) -> Optional[dict]:
        """The manifest on disk, or None when there is none."""
        try:
            with open(self.manifest_path, "r") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise FeatureCacheError(f"Feature-cache manifest {self.manifest_path} is unreadable or corrupt: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise FeatureCacheError(f"{self.manifest_path} is not a RegionSpot feature-cache manifest.")
        return manifest

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            manifest = self.read_manifest()
            if manifest is None:
                raise FeatureCacheError(
                    f"No feature cache at {self.root} (no {MANIFEST_NAME}): create it with "
                    f"tools/extract_features.py --config-file <config> --output {self.root}"
                )
            self._manifest = manifest
        return self._manifest

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.root, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        with open(os.path.join(self.root, ".manifest.lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def prepare(self, settings: dict, datasets: Dict[str, int], views: Sequence[CachedView]) -> dict:
        """
        Create the manifest, or check an existing one against ``settings`` and add ``datasets``
        ({name: number of images}) and ``views`` to it. Refuses (:class:`StaleFeatureCacheError`) to
        mix other settings, another definition of a view name or another size of a dataset into it.
        """
        with self._locked():
            manifest = self.read_manifest()
            if manifest is None:
                manifest = dict(copy.deepcopy(settings), views={}, datasets={}, created=time.strftime("%Y-%m-%d %H:%M:%S"))
            else:
                _compare(self.root, manifest, settings, _CFG_FIELDS + _MODEL_FIELDS, "the current config")
            for v in views:
                known = manifest["views"].get(v.name)
                if known is not None and known != v.definition():
                    raise StaleFeatureCacheError(
                        f"Feature cache {self.root} has a view {v.name!r} defined as {known}, not {v.definition()}. {_RERUN}."
                    )
                manifest["views"][v.name] = v.definition()
            for name, n in datasets.items():
                entry = manifest["datasets"].setdefault(name, {"num_images": int(n), "views": []})
                if entry["num_images"] != int(n):
                    raise StaleFeatureCacheError(
                        f"Feature cache {self.root} holds dataset {name!r} with {entry['num_images']} images, but it "
                        f"has {n} now: the dataset changed. {_RERUN}."
                    )
                entry["views"] += [v.name for v in views if v.name not in entry["views"]]
            manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        self._manifest = manifest
        return manifest

    def check(self, settings: dict, datasets: Optional[Iterable[str]] = None):
        """
        Raise :class:`StaleFeatureCacheError` unless the cache was made with ``settings``, and
        :class:`FeatureCacheError` when one of ``datasets`` is not in it.

        ``settings`` are the current frozen models' settings, computed by
        :mod:`regionspot.engine.fingerprints` (which :func:`regionspot.engine.check_feature_cache`
        calls this with):

        * a config's settings (they hold ``format_version``; ``settings_from_cfg``): frozen-model
          types, weights fingerprints, FROZEN.SEED, CLIP.INPUT_SIZE, precision, and the tensor
          fingerprints of seeded random weights. Settings without fingerprints (no
          ``weights_sha256``) are compared without them: a first check that hashes nothing.
        * a built model's fingerprints (``frozen_fingerprints``): tensor fingerprints, dimensions,
          precision.
        """
        manifest = self.manifest
        if "format_version" in settings:
            if manifest.get("format_version") != FORMAT_VERSION:
                _compare(self.root, manifest, {"format_version": FORMAT_VERSION}, _CFG_FIELDS[:1], "this code")
            for part in ("sam", "clip"):
                if "weights" not in settings.get(part, {}):
                    continue
                source = {True: "a weights file", False: "seeded random weights"}
                _compare(
                    self.root,
                    {"source": source[bool(_get(manifest, (part, "weights_sha256")))]},
                    {"source": source[bool(settings[part]["weights"])]},
                    ((("source",), f"the source of {part.upper()}'s weights (MODEL.REGIONSPOT.{part.upper()}.WEIGHTS)"),),
                    "the config",
                )
            fields = [f for f in _CFG_FIELDS if _has(settings, f[0])]
            fields += [f for f in _MODEL_FIELDS if "tensors_sha256" in f[0] and _has(settings, f[0])]
            _compare(self.root, manifest, settings, fields, "the config")
        else:
            _compare(self.root, manifest, settings, _MODEL_FIELDS, "the model")
        for name in datasets or ():
            if name not in manifest.get("datasets", {}):
                raise FeatureCacheError(
                    f"Feature cache {self.root} has no features of dataset {name!r} (it has "
                    f"{sorted(manifest.get('datasets', {}))}): run tools/extract_features.py --dataset {name} "
                    f"--output {self.root} with the same config."
                )

    def dataset_views(self, dataset: str) -> List[str]:
        entry = self.manifest.get("datasets", {}).get(dataset)
        if not entry or not entry.get("views"):
            raise FeatureCacheError(f"Feature cache {self.root} has no views of dataset {dataset!r}.")
        return list(entry["views"])

    def check_complete(self, dataset: str, views: Optional[Sequence[str]] = None):
        """Raise :class:`FeatureCacheError` when a view of ``dataset`` has fewer files than images."""
        n = self.manifest["datasets"][dataset]["num_images"]
        for view in views or self.dataset_views(dataset):
            d = os.path.join(self.root, _safe_dir(dataset), _safe_dir(view))
            files = os.listdir(d) if os.path.isdir(d) else []
            have = sum(1 for f in files if f.endswith(RECORD_SUFFIX) and not f.startswith("."))
            if have < n:
                raise FeatureCacheError(
                    f"Feature cache {self.root} is incomplete: view {view!r} of dataset {dataset!r} has {have} of "
                    f"{n} images (in {d}). Finish the extraction: run tools/extract_features.py again with "
                    f"--output {self.root} (it resumes)."
                )

    # -- records ----------------------------------------------------------------------------------
    def path(self, dataset: str, view: str, image_id) -> str:
        return os.path.join(self.root, _safe_dir(dataset), _safe_dir(view), image_key(image_id) + RECORD_SUFFIX)

    def save(
        self,
        dataset: str,
        view: str,
        image_id,
        *,
        region_tokens: torch.Tensor,
        clip_features: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_classes: torch.Tensor,
        image_size: Tuple[int, int],
        original_size: Tuple[int, int],
        annotations_sha256: str,
    ) -> int:
        """Write one record atomically; returns its size in bytes."""
        record = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "view": view,
            "image_id": _plain_id(image_id),
            "image_size": [int(image_size[0]), int(image_size[1])],
            "original_size": [int(original_size[0]), int(original_size[1])],
            "annotations_sha256": annotations_sha256,
            "region_tokens": region_tokens.detach().to("cpu", FEATURE_DTYPE).contiguous().clone(),
            "clip_features": clip_features.detach().to("cpu", FEATURE_DTYPE).contiguous().clone(),
            "gt_boxes": gt_boxes.detach().to("cpu", torch.float32).reshape(-1, 4).contiguous().clone(),
            "gt_classes": gt_classes.detach().to("cpu", torch.int64).reshape(-1).contiguous().clone(),
        }
        n = len(record["gt_classes"])
        if record["region_tokens"].ndim != 2 or len(record["region_tokens"]) != n or len(record["gt_boxes"]) != n:
            raise ValueError(
                f"A record needs [N, C] tokens, [N, 4] boxes and [N] classes; got {list(record['region_tokens'].shape)}, "
                f"{list(record['gt_boxes'].shape)}, {list(record['gt_classes'].shape)}."
            )
        record["sha256"] = _record_digest(record)
        buf = io.BytesIO()
        torch.save(record, buf)
        data = buf.getvalue()
        path = self.path(dataset, view, image_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, data)
        return len(data)

    def load(self, dataset: str, view: str, image_id, annotations_sha256: Optional[str] = None) -> dict:
        """
        One verified record. Raises :class:`FeatureCacheError` naming the file when it is missing,
        unreadable, fails its digest, belongs to another image/view/dataset, has other dimensions
        than the manifest says, or was made from other annotations (``annotations_sha256``).
        """
        path = self.path(dataset, view, image_id)
        fix = f"Re-run tools/extract_features.py with --output {self.root} to (re)write it."
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FeatureCacheError(
                f"Feature cache file missing: {path} (dataset {dataset!r}, view {view!r}, image_id {image_id!r}). {fix}"
            ) from None
        try:
            record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a record")
            digest_ok = record.get("sha256") == _record_digest(record)
        except Exception as e:
            raise FeatureCacheError(
                f"Feature cache file {path} is corrupt or unreadable ({type(e).__name__}: {e}). {fix}"
            ) from e
        if not digest_ok:
            raise FeatureCacheError(f"Feature cache file {path} is corrupt: its content does not match its checksum. {fix}")
        expected = {"format_version": FORMAT_VERSION, "dataset": dataset, "view": view, "image_id": _plain_id(image_id)}
        for k, v in expected.items():
            if record.get(k) != v:
                raise FeatureCacheError(f"Feature cache file {path} holds {k}={record.get(k)!r}, expected {v!r}. {fix}")
        if annotations_sha256 is not None and record["annotations_sha256"] != annotations_sha256:
            raise FeatureCacheError(
                f"Feature cache file {path} was extracted from other annotations of image {image_id!r} than dataset "
                f"{dataset!r} has now: the dataset changed. {_RERUN}."
            )
        m = self._manifest
        if m is not None and "token_dim" in m.get("sam", {}) and "num_tokens" in m.get("clip", {}):
            tok, feat = record["region_tokens"], record["clip_features"]
            want_tok, want_feat = (m["sam"]["token_dim"],), (m["clip"]["num_tokens"], m["clip"]["width"])
            if tok.ndim != 2 or tuple(tok.shape[1:]) != want_tok or tuple(feat.shape) != want_feat:
                raise FeatureCacheError(
                    f"Feature cache file {path} has tokens {list(tok.shape)} and CLIP features {list(feat.shape)}, "
                    f"but the manifest of {self.root} says [N, {want_tok[0]}] and {list(want_feat)}. {fix}"
                )
        return record

    def verify(self, dataset: str, view: str, image_id, annotations_sha256: Optional[str] = None) -> bool:
        """Whether the record exists and loads (see :meth:`load`)."""
        try:
            self.load(dataset, view, image_id, annotations_sha256)
        except FeatureCacheError:
            return False
        return True


def _safe_dir(name: str) -> str:
    return image_key(name)


# -------------------------------------------------------------------------------------------------
# Training from the cache
class CachedFeatureMapper:
    """
    Dataset dict -> model input from the cache: one of the dataset's cached views drawn at random
    (numpy's global RNG, which detectron2 seeds per process and data-loader worker from ``SEED``),
    no image decoding. Returns the dict's keys (without ``annotations``) plus ``region_tokens``
    [N, token_dim] and ``clip_features`` [L, D_v] (fp16, as stored), ``instances`` (``gt_boxes``
    in the view's pixels, ``gt_classes``) and the chosen ``cache_view``; ``height``/``width`` stay
    the dataset's (detectron2's aspect-ratio grouping reads them).
    """

    def __init__(self, cache: FeatureCache, dataset_name: str, views: Optional[Sequence[str]] = None):
        self.cache = cache
        self.dataset_name = dataset_name
        self.views = list(views) if views else cache.dataset_views(dataset_name)

    def __call__(self, dataset_dict: dict) -> dict:
        view = self.views[np.random.randint(len(self.views))] if len(self.views) > 1 else self.views[0]
        if "image_id" not in dataset_dict:
            raise KeyError(f"A dict of dataset {self.dataset_name!r} has no 'image_id'; the feature cache is keyed by it.")
        digest = annotations_digest(dataset_dict["annotations"]) if "annotations" in dataset_dict else None
        record = self.cache.load(self.dataset_name, view, dataset_dict["image_id"], digest)
        image_size = tuple(record["image_size"])
        instances = Instances(image_size)
        instances.gt_boxes = Boxes(record["gt_boxes"])
        instances.gt_classes = record["gt_classes"]
        out = {k: v for k, v in dataset_dict.items() if k != "annotations"}
        out.setdefault("height", record["original_size"][0])
        out.setdefault("width", record["original_size"][1])
        out.update(
            region_tokens=record["region_tokens"],
            clip_features=record["clip_features"],
            instances=instances,
            cache_view=view,
        )
        return out


def build_cached_train_loader(cfg, check_cache: Callable[[FeatureCache], None]):
    """
    The training loader over ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR``: ``check_cache(cache)`` checks
    that the cache fits the frozen models of the config (stale caches raise
    :class:`StaleFeatureCacheError`; :func:`regionspot.engine.check_feature_cache`, which
    :func:`regionspot.engine.build_train_loader` passes), then every DATASETS.TRAIN entry is checked
    to be complete and :func:`regionspot.data.multi_dataset.build_multi_dataset_train_loader` is
    built with :class:`CachedFeatureMapper`. ``INPUT.*`` augmentations do not apply: the cached
    views are the augmentations.
    """
    from .multi_dataset import build_multi_dataset_train_loader

    cache = FeatureCache(cfg.MODEL.REGIONSPOT.FEATURE_CACHE.DIR)
    t0 = time.perf_counter()
    check_cache(cache)
    for name in cfg.DATASETS.TRAIN:
        cache.check_complete(name)
    logger.info(
        "Training from the feature cache %s (checked in %.1f s); views per dataset: %s",
        cache.root,
        time.perf_counter() - t0,
        {n: cache.dataset_views(n) for n in cfg.DATASETS.TRAIN},
    )
    return build_multi_dataset_train_loader(cfg, mapper_factory=lambda cfg, name: CachedFeatureMapper(cache, name))
