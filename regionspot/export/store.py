"""
Region stores: boxes, L2-normalised region embeddings and mask scores of many images, written once
(``tools/store_region_embeddings.py``) and re-scored against any vocabulary later without SAM or
CLIP's image tower (``tools/rescore_regions.py``).

Layout of a store directory::

    manifest.json            format, model fingerprints (SHA-256 of the SAM, CLIP and fusion state
                             dicts), protocol (how the regions were computed), source
    shard-<rank>-<n>.npz     images written together (atomically): per image its id, file, size,
                             region offsets; per region box, embedding, mask score, box score,
                             empty-box flag, and RLE masks when asked for

An image is in the store once a shard holding it exists, so an interrupted run resumes by skipping
those images. A store is tied to its models: opening it with other weights raises
:class:`StaleStoreError` naming both fingerprints.
"""
import glob
import json
import os
import time
import uuid
from typing import Dict, Iterator, List, Optional

import numpy as np

__all__ = ["RegionStore", "StaleStoreError", "STORE_FORMAT", "check_fingerprints"]

STORE_FORMAT = "regionspot-region-store"
STORE_VERSION = 1


class StaleStoreError(ValueError):
    """The store was written with other models than the ones given."""


def check_fingerprints(root: str, stored: Dict[str, str], current: Dict[str, str]) -> None:
    """Raise :class:`StaleStoreError` naming every model whose fingerprint differs, with both values."""
    differ = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if differ:
        lines = "; ".join(f"{k}: store {stored.get(k)} vs model {current.get(k)}" for k in differ)
        raise StaleStoreError(
            f"The region store {root} was written with other weights than this model's ({lines}; SHA-256 of the "
            "state dicts). Its embeddings do not belong to this model: use the config and weights it was made with "
            "(its manifest.json names them), or write a new store."
        )


class RegionStore:
    """
    Args:
        root: the store directory.
    """

    def __init__(self, root: str):
        self.root = root
        path = os.path.join(root, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{root} is no region store (no manifest.json); write one with "
                                    "tools/store_region_embeddings.py.")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{path} is not a region-store manifest (format {self.manifest.get('format')!r}).")

    @classmethod
    def create(cls, root: str, manifest: dict) -> "RegionStore":
        """
        Open ``root`` for writing with ``manifest`` (written when new). An existing store must have
        the same model fingerprints (else :class:`StaleStoreError`) and protocol (else ``ValueError``).
        """
        manifest = dict(manifest, format=STORE_FORMAT, format_version=STORE_VERSION)
        path = os.path.join(root, "manifest.json")
        if os.path.isfile(path):
            store = cls(root)
            check_fingerprints(root, store.manifest["fingerprints"], manifest["fingerprints"])
            if store.manifest.get("protocol") != manifest.get("protocol"):
                raise ValueError(
                    f"The region store {root} was written with protocol {store.manifest.get('protocol')}, this run "
                    f"uses {manifest.get('protocol')}: write into another directory."
                )
            return store
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, path)
        return cls(root)

    def check(self, fingerprints: Dict[str, str]) -> None:
        check_fingerprints(self.root, self.manifest["fingerprints"], fingerprints)

    def shards(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.root, "shard-*.npz")))

    def done_images(self) -> set:
        """Keys of the images already stored."""
        done = set()
        for shard in self.shards():
            with np.load(shard, allow_pickle=False) as z:
                done.update(z["image_keys"].tolist())
        return done

    def write_shard(self, images: List[dict], rank: int = 0) -> Optional[str]:
        """
        Write the records of some images as one shard (atomically).

        Each record: ``key`` (str, unique in the store), ``image_id`` (int, or -1), ``file_name``,
        ``height``, ``width``, ``boxes`` [N, 4], ``embeddings`` [N, D], ``mask_scores`` [N],
        ``box_scores`` [N] (NaN without), ``empty_box`` [N] bool, optionally ``masks_rle`` (N RLE dicts).
        """
        if not images:
            return None
        counts = np.array([len(r["boxes"]) for r in images], dtype=np.int64)
        arrays = {
            "image_keys": np.array([r["key"] for r in images]),
            "image_ids": np.array([int(r.get("image_id", -1)) for r in images], dtype=np.int64),
            "file_names": np.array([r.get("file_name", "") for r in images]),
            "sizes": np.array([[r["height"], r["width"]] for r in images], dtype=np.int64),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "boxes": np.concatenate([np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in images]),
            "embeddings": np.concatenate([np.asarray(r["embeddings"], np.float32) for r in images]),
            "mask_scores": np.concatenate([np.asarray(r["mask_scores"], np.float32).reshape(-1) for r in images]),
            "box_scores": np.concatenate([np.asarray(r["box_scores"], np.float32).reshape(-1) for r in images]),
            "empty_box": np.concatenate([np.asarray(r["empty_box"], bool).reshape(-1) for r in images]),
        }
        if all("masks_rle" in r for r in images):
            arrays["masks_rle"] = np.array([json.dumps(m) for r in images for m in r["masks_rle"]])
        name = f"shard-r{rank:03d}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        path = os.path.join(self.root, name)
        tmp = path[: -len(".npz")] + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    def images(self) -> Iterator[dict]:
        """Every stored image's record (as :meth:`write_shard` takes them), shard by shard."""
        for shard in self.shards():
            with np.load(shard, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            rles = data.get("masks_rle")
            for i, key in enumerate(data["image_keys"].tolist()):
                a, b = int(data["offsets"][i]), int(data["offsets"][i + 1])
                record = {
                    "key": key,
                    "image_id": int(data["image_ids"][i]),
                    "file_name": str(data["file_names"][i]),
                    "height": int(data["sizes"][i][0]),
                    "width": int(data["sizes"][i][1]),
                }
                for field in ("boxes", "embeddings", "mask_scores", "box_scores", "empty_box"):
                    record[field] = data[field][a:b]
                if rles is not None:
                    record["masks_rle"] = [json.loads(s) for s in rles[a:b].tolist()]
                yield record


def rescore_image(record: dict, text_embeddings, logit_scale, class_score: str, selector, use_box_scores: bool = True):
    """
    The detections of one stored image against ``text_embeddings`` [C, D] (torch), as the head
    selects them: ``logits = logit_scale * embeddings @ text.T``, class scores, box scores when
    stored, regions whose box is empty once clipped dropped.

    Returns:
        (regions [K], classes [K], scores [K], logits [N, C]) as torch tensors.
    """
    import torch

    emb = torch.from_numpy(np.ascontiguousarray(record["embeddings"]))
    logits = logit_scale * emb @ text_embeddings.to(emb.dtype).t()
    probs = logits.sigmoid() if class_score == "sigmoid" else logits.softmax(dim=-1)
    box_scores = None
    raw = record["box_scores"]
    if use_box_scores and len(raw) and not np.isnan(raw).any():
        box_scores = torch.from_numpy(np.ascontiguousarray(raw)).sigmoid()
    valid = torch.from_numpy(~np.asarray(record["empty_box"], bool))
    regions, classes, scores = selector(probs, box_scores, valid)
    return regions, classes, scores, logits
