"""
:class:`OnnxRegionSpotPredictor`: :class:`regionspot.RegionSpotPredictor` on the graphs of
``tools/export_onnx.py``, with ONNX Runtime, numpy and PIL only (no torch, no detectron2).
"""
import json
import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np

from .image_ops import postprocess_masks, preprocess_shape, resize_bilinear, sam_resize
from .tokenizer import ClipTokenizer, clean_class_name, text_key

logger = logging.getLogger(__name__)

__all__ = ["OnnxRegionSpotPredictor"]

EMPTY_BOX_POLICIES = ("warn", "error")


def _rgb_uint8(image, image_format: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(
            f"set_image() takes a uint8 image, got {image.dtype}; convert e.g. with "
            "(image * 255).round().clip(0, 255).astype(np.uint8) for floats in [0, 1]."
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"set_image() takes an [H, W, 3] image, got shape {list(image.shape)}.")
    if image.shape[2] in (1, 2):
        image = np.repeat(image[:, :, :1], 3, axis=2)
    image = image[:, :, :3]
    if image_format == "BGR":
        image = image[:, :, ::-1]
    elif image_format != "RGB":
        raise ValueError(f"image_format={image_format!r}: use 'RGB' or 'BGR'.")
    return np.ascontiguousarray(image)


class OnnxRegionSpotPredictor:
    """
    Same API and outputs as :class:`regionspot.RegionSpotPredictor` (numpy arrays instead of tensors).

    Example::

        predictor = OnnxRegionSpotPredictor("export/")
        predictor.set_vocabulary(["cat", "dog"])
        predictor.set_image(image)               # [H, W, 3] uint8 RGB
        out = predictor.predict(boxes)           # [N, 4] XYXY pixels

    Args:
        export_dir: the output of ``tools/export_onnx.py`` (``manifest.json`` and the graphs).
        empty_boxes: "warn" or "error", as the torch predictor.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads of each session (default: ONNX Runtime's).
        session_options: extra ``onnxruntime.SessionOptions`` (overrides ``threads``).
        graphs: graph files to use instead of the manifest's, e.g. ``{"head": "head.int8.onnx"}``.
        chunk_size: prompts per run of the prompt decoder (bounds its memory, as
            ``MODEL.REGIONSPOT.SAM.PROMPT_CHUNK_SIZE`` does for the torch path).
    """

    def __init__(self, export_dir: str, empty_boxes: str = "warn", providers=None, threads: Optional[int] = None,
                 session_options=None, graphs: Optional[Dict[str, str]] = None, chunk_size: int = 32):
        self.chunk_size = max(int(chunk_size), 1)
        import onnxruntime as ort

        if empty_boxes not in EMPTY_BOX_POLICIES:
            raise ValueError(f"empty_boxes={empty_boxes!r}: use one of {EMPTY_BOX_POLICIES}.")
        self.empty_boxes = empty_boxes
        self.export_dir = export_dir
        with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != "regionspot-onnx":
            raise ValueError(f"{export_dir} holds no RegionSpot ONNX export (manifest format {self.manifest.get('format')!r}).")
        if session_options is None:
            session_options = ort.SessionOptions()
            if threads:
                session_options.intra_op_num_threads = int(threads)
        files = dict(self.manifest["graphs"])
        files.update(graphs or {})
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(os.path.join(export_dir, file), sess_options=session_options, providers=providers)
            for name, file in files.items()
        }
        self.tokenizer = ClipTokenizer(
            os.path.join(export_dir, self.manifest["bpe_vocabulary"]), self.manifest["clip"]["context_length"]
        )
        self.baked = self.manifest.get("baked_vocabulary")
        self.class_score = self.manifest["class_score"]
        self.templates = list(self.manifest["prompt_templates"])
        self.class_names = []
        self.text_embeddings = None
        self._image = None
        if self.baked:
            self.class_names = list(self.baked)

    # ---------------------------------------------------------------------------------------
    def encode_text(self, class_names: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """[C, D_t] L2-normalised prompt-ensemble embeddings (the mean of each class's sentence embeddings)."""
        sentences = [t.format(clean_class_name(n)) for n in class_names for t in self.templates]
        tokens = self.tokenizer(sentences)
        unique, inverse = np.unique(tokens, axis=0, return_inverse=True)
        lengths = unique.argmax(axis=-1) + 1
        order = np.argsort(-lengths, kind="stable")
        session = self.sessions["text"]
        encoded = None
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = int(lengths[rows].max())
            (emb,) = session.run(None, {"text_tokens": unique[rows, :length]})
            if encoded is None:
                encoded = np.empty((len(unique), emb.shape[1]), dtype=np.float32)
            encoded[rows] = emb
        per_sentence = encoded[inverse.reshape(-1)]
        per_class = per_sentence.reshape(len(class_names), len(self.templates), -1).mean(axis=1)
        return (per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)).astype(np.float32)

    def set_vocabulary(self, class_names: Sequence[str], embeddings: Optional[np.ndarray] = None):
        """
        Classes to recognise from now on: the names are encoded by the exported text tower (no
        re-export), or given as [C, D_t] L2-normalised ``embeddings``.
        """
        if class_names is None or isinstance(class_names, (str, bytes)):
            raise ValueError("set_vocabulary() takes a list of class names, e.g. ['cat', 'dog'].")
        names = [str(n) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else n for n in class_names]
        if not names or not all(isinstance(n, str) and text_key(n) for n in names):
            raise ValueError(f"The vocabulary must be non-empty class names (str), got {list(class_names)!r}.")
        keys = [text_key(n) for n in names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"The vocabulary names some classes more than once (as CLIP reads them): {names}.")
        self._check_scores_are_informative(names)
        if self.baked and names != list(self.baked):
            raise ValueError(
                f"This export has the vocabulary {self.baked} baked in; export without --bake-vocabulary to "
                "change it at run time."
            )
        if self.baked:
            self.class_names = names
            return
        if embeddings is None:
            embeddings = self.encode_text(names)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        dim = self.manifest["clip"]["embed_dim"]
        if embeddings.shape != (len(names), dim) or not np.isfinite(embeddings).all():
            raise ValueError(f"embeddings must be finite and shaped [{len(names)}, {dim}], got {list(embeddings.shape)}.")
        self.class_names, self.text_embeddings = names, embeddings

    def _check_scores_are_informative(self, names):
        if len(names) == 1 and self.class_score == "softmax":
            raise ValueError(
                f"The vocabulary has one class ({names[0]!r}) and class scores are a softmax over the vocabulary: "
                "every score would be 1.0. Add the other classes, or a generic entry such as 'object'."
            )

    # ---------------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray, image_format: str = "RGB"):
        """Run SAM's image encoder and CLIP on an [H, W, 3] uint8 image."""
        image = _rgb_uint8(image, image_format)
        sam = self.manifest["sam"]
        resized = sam_resize(image, sam["resize_longest_side"])
        (embedding,) = self.sessions["sam_encoder"].run(
            None, {"image": np.ascontiguousarray(resized.transpose(2, 0, 1))[None]}
        )
        clip = self.manifest["clip"]
        size = clip["input_size"]
        view = resize_bilinear(image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0), (size, size), clip["antialias"])
        (features,) = self.sessions["clip_image"].run(None, {"image": view[None].astype(np.float32)})
        self._image = {
            "embedding": embedding,
            "clip_features": features,
            "original_size": image.shape[:2],
            "input_size": resized.shape[:2],
        }

    def _to_sam_frame(self, coords: np.ndarray) -> np.ndarray:
        old_h, old_w = self._image["original_size"]
        new_h, new_w = preprocess_shape(old_h, old_w, self.manifest["sam"]["resize_longest_side"])
        c = np.array(coords, dtype=np.float64, copy=True)
        c[..., 0] = c[..., 0] * (new_w / old_w)
        c[..., 1] = c[..., 1] * (new_h / old_h)
        return c.astype(np.float32)

    def _check_prompts(self, boxes, point_coords, point_labels):
        height, width = self._image["original_size"]
        empty = None
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be [N, 4] XYXY, got shape {list(boxes.shape)}.")
            if not np.isfinite(boxes).all():
                raise ValueError("boxes have NaN or infinite coordinates: fix or drop those rows.")
            if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
                raise ValueError("boxes have x1 < x0 or y1 < y0: boxes are XYXY [x0, y0, x1, y1] (XYWH given?).")
            clipped = boxes.copy()
            clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
            clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
            empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
            if empty.any():
                message = f"boxes rows {np.flatnonzero(empty)[:10].tolist()} are empty once clipped to the {height}x{width} image."
                if self.empty_boxes == "error":
                    raise ValueError(message + " Give boxes that overlap the image, or drop them.")
                logger.warning(message + " They are scored like the others; out['empty_box'] is True for them.")
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError("point_coords [N, P, 2] and point_labels [N, P] go together.")
            point_coords = np.asarray(point_coords, dtype=np.float64)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim != 3 or point_coords.shape[2] != 2 or point_labels.shape != point_coords.shape[:2]:
                raise ValueError(
                    f"point_coords must be [N, P, 2] and point_labels [N, P], got {list(point_coords.shape)} and "
                    f"{list(point_labels.shape)}."
                )
            if not np.isin(point_labels, (-1, 0, 1)).all():
                raise ValueError("point_labels must be 1 (foreground), 0 (background) or -1 (padding).")
            real = point_labels != -1
            xy = point_coords[real]
            if not np.isfinite(xy).all() or (xy < 0).any() or (xy[:, 0] > width).any() or (xy[:, 1] > height).any():
                raise ValueError(f"point_coords must lie inside the {height}x{width} image (XY pixels).")
            if boxes is not None and len(boxes) != len(point_coords):
                raise ValueError(f"{len(boxes)} boxes but {len(point_coords)} point prompts: give one of each per region.")
        return boxes, point_coords, point_labels, empty

    def predict(self, boxes=None, point_coords=None, point_labels=None, return_masks: bool = True,
                return_embeddings: bool = False) -> Dict[str, np.ndarray]:
        """
        Recognise N regions of the current image; see :meth:`regionspot.RegionSpotPredictor.predict`
        (same arguments and outputs, as numpy arrays).
        """
        if self._image is None:
            raise RuntimeError("Call set_image(image) before predict().")
        if boxes is None and point_coords is None and point_labels is None:
            raise ValueError("predict() needs boxes [N, 4] or point_coords [N, P, 2] with point_labels [N, P].")
        if not self.class_names:
            raise RuntimeError("Call set_vocabulary(class_names) before predict().")
        self._check_scores_are_informative(self.class_names)
        boxes, point_coords, point_labels, empty = self._check_prompts(boxes, point_coords, point_labels)
        n = len(boxes) if boxes is not None else len(point_coords)
        coords, labels = [], []
        if point_coords is not None:
            coords.append(self._to_sam_frame(point_coords))
            labels.append(point_labels.astype(np.float32))
        if boxes is not None:
            coords.append(self._to_sam_frame(boxes.reshape(-1, 2, 2)))
            labels.append(np.tile(np.array([[2.0, 3.0]], dtype=np.float32), (n, 1)))
        else:  # SAM's prompt encoder pads point prompts without a box with one "not a point"
            coords.append(np.zeros((n, 1, 2), dtype=np.float32))
            labels.append(np.full((n, 1), -1.0, dtype=np.float32))
        state = self._image
        dim = self.manifest["clip"]["embed_dim"]
        num_classes = len(self.class_names)
        if n == 0:
            m = self.manifest["sam"]["low_res_mask_size"]
            tokens = np.zeros((0, self.manifest["sam"]["token_dim"]), np.float32)
            low_res, iou = np.zeros((0, 1, m, m), np.float32), np.zeros((0,), np.float32)
            logits = np.zeros((0, num_classes), np.float32)
            scores, region = logits.copy(), np.zeros((0, dim), np.float32)
        else:
            coords, labels = np.concatenate(coords, axis=1), np.concatenate(labels, axis=1)
            outs = []
            for start in range(0, n, self.chunk_size):  # prompts are decoded independently of each other
                outs.append(self.sessions["sam_decoder"].run(None, {
                    "image_embedding": state["embedding"],
                    "point_coords": np.ascontiguousarray(coords[start : start + self.chunk_size]),
                    "point_labels": np.ascontiguousarray(labels[start : start + self.chunk_size]),
                }))
            tokens, low_res, iou = (np.concatenate(parts) for parts in zip(*outs))
            feeds = {"tokens": tokens, "clip_features": state["clip_features"]}
            if not self.baked:
                feeds["text_embeddings"] = self.text_embeddings
            logits, scores, region = self.sessions["head"].run(None, feeds)
        result = {
            "logits": logits,
            "scores": scores,
            "classes": logits.argmax(axis=-1) if n else np.zeros((0,), np.int64),
            "mask_scores": iou,
            "empty_box": empty if empty is not None else np.zeros(n, dtype=bool),
        }
        if return_masks:
            sam = self.manifest["sam"]
            result["masks"] = postprocess_masks(
                low_res, state["input_size"], state["original_size"], sam["resize_longest_side"], sam["mask_threshold"]
            )
        if return_embeddings:
            result["embeddings"] = region
        return result
