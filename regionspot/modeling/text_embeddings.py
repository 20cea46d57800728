"""
Class text embeddings of a vocabulary: the 81-template prompt ensemble, encoded by CLIP's text
tower and cached on disk.
"""
import hashlib
import logging
import numbers
import os
import pickle
from collections import defaultdict
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

import clip
from clip.simple_tokenizer import basic_clean, whitespace_clean

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPT_TEMPLATES",
    "clean_class_name",
    "prompt_text_key",
    "validate_class_names",
    "TextEmbeddingCache",
    "PromptEnsembleEncoder",
    "encode_vocabulary",
    "default_cache_dir",
]

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

# Bumped whenever the way embeddings are computed changes, so old cache files are not reused. Not
# bumped for the context-trimmed, deduplicated encoding: it gives the same embeddings (to float
# rounding, < 1e-5), so entries written before it stay valid.
_CACHE_FORMAT = "regionspot-text-v1"


def clean_class_name(name: str) -> str:
    """Remove the COCO-panoptic suffixes ``-other``, ``-merged``, ``-stuff``; nothing else changes."""
    for suffix in ("-other", "-merged", "-stuff"):
        name = name.replace(suffix, "")
    return name


def prompt_text_key(name: str) -> str:
    """
    The text CLIP actually reads for a class name: :func:`clean_class_name`, then CLIP's own
    tokenizer clean-up (``ftfy`` and HTML unescaping, whitespace collapsed, lower-cased). Two names
    with the same key get identical text embeddings.
    """
    return whitespace_clean(basic_clean(clean_class_name(name))).lower()


def validate_class_names(class_names, what: str = "the vocabulary") -> List[str]:
    """
    Check a vocabulary and return it as a list of str, where it enters (``set_vocabulary``,
    ``add_vocabulary``, the text cache).

    Accepted: ``str`` entries (numpy strings included), kept exactly as given (they are the
    cache key and what ``pred_classes`` index). Integers (e.g. digit classes read from a json) are
    converted with ``str()`` and a logged warning.

    Refused with ``ValueError``:
      * None, a single string (it would be read letter by letter) or a non-iterable;
      * an empty vocabulary;
      * entries that are None, bool, float, bytes or any other non-str, non-int type (``str()``
        of them is rarely the intended class name: ``b'cat'`` would become the text "b'cat'");
      * empty or whitespace-only names, also once a panoptic suffix is removed (the prompt
        "a photo of a ." describes nothing);
      * names CLIP reads as the same text (:func:`prompt_text_key`: exact repeats, or names that
        differ only in case, spacing or a COCO-panoptic suffix): their embeddings are identical, so
        a softmax splits each region's probability between them and training gives them
        contradicting targets.

    Args:
        class_names: the names, in class-index order.
        what: how the vocabulary is called in messages.

    Returns:
        the names as a list of str.
    """
    subject = what[:1].upper() + what[1:]  # at the start of a sentence
    if class_names is None:
        raise ValueError(f"{subject} is None: give a list of class names, e.g. ['cat', 'dog'].")
    if isinstance(class_names, (str, bytes)):
        raise ValueError(
            f"{subject} is a single string {class_names!r}, which would be read letter by letter: give a list of "
            "names, e.g. ['cat', 'dog'] (regionspot.data.vocabularies.parse_custom_vocabulary splits "
            "comma-separated text)."
        )
    try:
        entries = list(class_names)
    except TypeError as e:
        raise ValueError(f"{subject} must be a list of class names, got {type(class_names).__name__}.") from e
    if not entries:
        raise ValueError(f"{subject} is empty: give at least one class name.")
    names, converted, bad = [], [], []
    for i, n in enumerate(entries):
        if isinstance(n, str):
            names.append(str(n))
        elif isinstance(n, numbers.Integral) and not isinstance(n, bool):  # numpy integers too, not numpy bools
            names.append(str(n))
            converted.append(i)
        else:
            bad.append(f"{i}: {n!r} ({type(n).__name__})")
            names.append("")
    if bad:
        raise ValueError(
            f"{subject} has entries that are not strings (index: value): {', '.join(bad[:10])}"
            f"{f' (and {len(bad) - 10} more)' if len(bad) > 10 else ''}. Class names must be str."
        )
    if converted:
        logger.warning(
            f"{subject}: integer class names at indices {converted[:10]} converted to text "
            f"({[names[i] for i in converted[:10]]}); pass str to silence this."
        )
    keys = [prompt_text_key(n) for n in names]
    blank = [i for i, k in enumerate(keys) if not k]
    if blank:
        raise ValueError(
            f"{subject} has empty or whitespace-only names at indices {blank[:10]} "
            f"({[names[i] for i in blank[:10]]}): every class needs a name (drop those entries)."
        )
    groups = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    repeated = [ids for ids in groups.values() if len(ids) > 1]
    if repeated:
        listed = "; ".join(" = ".join(f"{names[i]!r} (index {i})" for i in ids) for ids in repeated[:10])
        raise ValueError(
            f"{subject} names some classes more than once, as CLIP reads them (it lower-cases, collapses "
            f"spaces, and the suffixes -other/-merged/-stuff are removed): {listed}. Identical names get "
            "identical text embeddings, which split each region's probability between them. Keep one of "
            "each, or make them distinct (e.g. 'apple (fruit)')."
        )
    return names


def default_cache_dir() -> str:
    return os.environ.get("REGIONSPOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "regionspot"))


@torch.no_grad()
def encode_vocabulary(
    clip_features,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
    show_progress: bool = True,
    stock: bool = False,
) -> torch.Tensor:
    """
    Encode class names with the prompt ensemble.

    Each distinct tokenized sentence is encoded once (repeated templates, or names whose
    sentences coincide, cost nothing extra), longest first in batches of ``batch_size`` sentences
    of similar length, each batch run only up to its longest sentence
    (:meth:`ClipDenseFeatures.encode_text`). The result equals the stock computation (every
    sentence in order at the full 77-token context, ``stock=True``) up to float rounding.

    Args:
        clip_features: a :class:`ClipDenseFeatures` (its text tower is used).
        class_names: C names; cleaned with :func:`clean_class_name`.
        templates: sentence templates with one ``{}``.
        batch_size: sentences per text-tower forward.
        show_progress: show a progress bar.
        stock: the reference path: every sentence, in order, through clip's own ``encode_text``
            at the full context (for equality checks and benchmarks).

    Returns:
        [C, D_t] float32, each row the mean of the un-normalised sentence embeddings of a class,
        L2-normalised as x / ||x||.

    Raises:
        ValueError: the names are refused by :func:`validate_class_names`, or ``batch_size`` < 1.
    """
    class_names = validate_class_names(class_names)
    if batch_size < 1:
        raise ValueError(f"batch_size (MODEL.REGIONSPOT.VOCAB.BATCH_SIZE) must be at least 1, got {batch_size}.")
    sentences = [t.format(clean_class_name(n)) for n in class_names for t in templates]
    # The model's own tokenizer when it has one (OpenCLIP models); OpenAI CLIP's otherwise.
    tokenize = getattr(clip_features, "tokenize", None) or clip.tokenize
    tokens = tokenize(sentences)
    desc = f"Encoding {len(class_names)} class names"
    if stock:
        out = []
        for start in tqdm(range(0, len(sentences), batch_size), desc=desc, unit="batch", disable=not show_progress):
            out.append(clip_features.encode_text(tokens[start : start + batch_size], stock=True).cpu())
        per_sentence = torch.cat(out)
    else:
        # The embedding is a function of the token ids alone: encode each distinct row once.
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        lengths = unique.argmax(dim=-1) + 1  # up to and including the EOT token
        # Longest first: batches of similar length waste little on padding, and a batch too big
        # for the device's memory fails at once rather than at the end.
        order = torch.argsort(lengths, descending=True, stable=True)
        logger.info(
            f"{desc}: {len(unique)} distinct sentences of {len(sentences)}, {lengths.float().mean():.1f} tokens on "
            f"average (longest {int(lengths.max())}) of the {tokens.shape[1]}-token context"
        )
        encoded = None
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not show_progress):
            rows = order[start : start + batch_size]
            emb = clip_features.encode_text(unique[rows]).cpu()
            if encoded is None:
                encoded = emb.new_empty(len(unique), emb.shape[1])
            encoded[rows] = emb
        per_sentence = encoded[inverse]
    per_class = per_sentence.view(len(class_names), len(templates), -1).mean(dim=1)
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
        The [C, D_t] embeddings of ``class_names`` (checked by :func:`validate_class_names`), read
        from the cache or encoded and stored.
        """
        class_names: List[str] = validate_class_names(class_names)
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


class PromptEnsembleEncoder:
    """
    Class names -> [C, D_t] L2-normalised embeddings: CLIP's text tower over the prompt-template
    ensemble (:func:`encode_vocabulary`), through the on-disk :class:`TextEmbeddingCache`. The
    default ``text_encoder`` of :class:`~regionspot.modeling.zero_shot_classifier.ZeroShotClassifier`.

    Args:
        clip_features: the frozen :class:`~regionspot.modeling.clip_features.ClipDenseFeatures`.
        cache: the embedding cache (default: one in :func:`default_cache_dir`).
        templates: prompt templates, ``{}`` standing for the name.
        batch_size: sentences per text-tower forward (``MODEL.REGIONSPOT.VOCAB.BATCH_SIZE``).
    """

    def __init__(
        self,
        clip_features,
        cache: Optional[TextEmbeddingCache] = None,
        templates: Sequence[str] = PROMPT_TEMPLATES,
        batch_size: int = 256,
    ):
        self.clip_features = clip_features
        self.cache = cache or TextEmbeddingCache()
        self.templates = tuple(templates)
        self.batch_size = int(batch_size)

    def __call__(self, class_names: Sequence[str]) -> torch.Tensor:
        return self.cache.get(self.clip_features, class_names, self.templates, self.batch_size)
