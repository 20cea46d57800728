"""
Class text embeddings of a vocabulary: the 81-template prompt ensemble, encoded by CLIP's text
tower and cached on disk.
"""
import hashlib
import logging
import os
import pickle
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

import clip

logger = logging.getLogger(__name__)

__all__ = ["PROMPT_TEMPLATES", "clean_class_name", "TextEmbeddingCache", "encode_vocabulary", "default_cache_dir"]

# The bare "{}." followed by CLIP's 80 ImageNet prompt templates (the published ensemble).
PROMPT_TEMPLATES = (
    "{}.",
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
assert len(PROMPT_TEMPLATES) == 81

# Bumped whenever the way embeddings are computed changes, so old cache files are not reused.
_CACHE_FORMAT = "regionspot-text-v1"


def clean_class_name(name: str) -> str:
    """Remove the COCO-panoptic suffixes ``-other``, ``-merged``, ``-stuff``; nothing else changes."""
    for suffix in ("-other", "-merged", "-stuff"):
        name = name.replace(suffix, "")
    return name


def default_cache_dir() -> str:
    return os.environ.get("REGIONSPOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "regionspot"))


@torch.no_grad()
def encode_vocabulary(
    clip_features,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
    show_progress: bool = True,
) -> torch.Tensor:
    """
    Encode class names with the prompt ensemble.

    Args:
        clip_features: a :class:`ClipDenseFeatures` (its text tower is used).
        class_names: C names; cleaned with :func:`clean_class_name`.
        templates: sentence templates with one ``{}``.
        batch_size: sentences per text-tower forward.
        show_progress: show a progress bar.

    Returns:
        [C, D_t] float32, each row the mean of the un-normalised sentence embeddings of a class,
        L2-normalised as x / ||x||.
    """
    if len(class_names) == 0:
        raise ValueError("The vocabulary is empty: give at least one class name.")
    sentences = [t.format(clean_class_name(n)) for n in class_names for t in templates]
    tokens = clip.tokenize(sentences)
    out = []
    steps = range(0, len(sentences), batch_size)
    bar = tqdm(steps, desc=f"Encoding {len(class_names)} class names", unit="batch", disable=not show_progress)
    for start in bar:
        out.append(clip_features.encode_text(tokens[start : start + batch_size]).cpu())
    per_sentence = torch.cat(out).view(len(class_names), len(templates), -1)
    per_class = per_sentence.mean(dim=1)
    return per_class / per_class.norm(dim=-1, keepdim=True)


def _text_tower_fingerprint(clip_features) -> str:
    """Hash of the text tower's weights: a cache entry follows the weights, not a file path."""
    model = clip_features.model
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("visual."):
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TextEmbeddingCache:
    """
    On-disk cache of vocabulary embeddings, keyed by the CLIP text-tower weights, the templates
    and the class names, so a second start with the same vocabulary encodes nothing.

    Args:
        cache_dir: directory of ``text_<key>.pt`` files; default :func:`default_cache_dir`.
    """

    def __init__(self, cache_dir: Optional[str] = None):
        self.cache_dir = cache_dir or default_cache_dir()
        self._fingerprints = {}

    def key(self, clip_features, class_names: Sequence[str], templates: Sequence[str]) -> str:
        model_id = id(clip_features.model)
        if model_id not in self._fingerprints:
            self._fingerprints[model_id] = _text_tower_fingerprint(clip_features)
        h = hashlib.sha256()
        for part in (_CACHE_FORMAT, self._fingerprints[model_id], "\x1f".join(templates), "\x1f".join(class_names)):
            h.update(part.encode("utf-8"))
            h.update(b"\x1e")
        return h.hexdigest()[:32]

    def path(self, key: str) -> str:
        return os.path.join(self.cache_dir, f"text_{key}.pt")

    def get(
        self,
        clip_features,
        class_names: Sequence[str],
        templates: Sequence[str] = PROMPT_TEMPLATES,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """
        The [C, D_t] embeddings of ``class_names``, read from the cache or encoded and stored.
        """
        class_names: List[str] = [str(n) for n in class_names]
        key = self.key(clip_features, class_names, templates)
        path = self.path(key)
        if os.path.isfile(path):
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
                logger.warning(f"Ignoring unreadable text-embedding cache file {path}: {e}")
            else:
                if entry.get("class_names") == class_names:
                    logger.info(f"Loaded {len(class_names)} class embeddings from {path}")
                    return entry["embeddings"]
                logger.warning(f"Text-embedding cache file {path} holds other names; re-encoding.")
        emb = encode_vocabulary(clip_features, class_names, templates, batch_size=batch_size)
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"class_names": class_names, "embeddings": emb}, tmp)
        os.replace(tmp, path)
        logger.info(f"Cached {len(class_names)} class embeddings in {path}")
        return emb
