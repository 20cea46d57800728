"""
The vocabulary as a classifier: class names -> CLIP text embeddings -> scores of region embeddings.

:class:`ZeroShotClassifier` is the one place where a vocabulary becomes a classifier. It holds the
current vocabulary (names and a non-persistent [C, D_t] buffer of their text embeddings, swapped at
run time: the number of classes is state, not structure), named vocabularies of training datasets,
and scores region embeddings against either. The text embeddings come from a ``text_encoder``
callable (by default the prompt-ensemble encoder of :mod:`.text_embeddings` with its on-disk cache),
so a subclass or another encoder can be swapped in without touching the head.
"""
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .input_checks import check_text_embeddings
from .text_embeddings import validate_class_names

logger = logging.getLogger(__name__)

__all__ = [
    "ZeroShotClassifier",
    "CLASS_SCORES",
    "region_text_logits",
    "single_class_softmax_message",
    "vocabulary_from_config",
]

# How a region's logits become class scores: "softmax" over the vocabulary (the authors'), or
# "sigmoid" of each class's logit on its own (the quantity the focal loss trains).
CLASS_SCORES = ("softmax", "sigmoid")


def region_text_logits(region_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale) -> torch.Tensor:
    """
    Scaled cosine similarity of regions and classes.

    Args:
        region_embeddings: [..., D_t] from :class:`~regionspot.modeling.fusion.RegionSpotFusion`.
        text_embeddings: [C, D_t], rows already L2-normalised.
        logit_scale: scalar (exp of CLIP's logit scale, 100 for the released models).

    Returns:
        [..., C] logits.
    """
    region = region_embeddings / (region_embeddings.norm(dim=-1, keepdim=True) + 1e-7)
    return logit_scale * region @ text_embeddings.to(region.dtype).t()


def single_class_softmax_message(class_name: str) -> str:
    """Why a one-class vocabulary with softmax scores says nothing, and what to do instead."""
    return (
        f"The vocabulary has one class ({class_name!r}) and class scores are a softmax over the vocabulary "
        "(MODEL.REGIONSPOT.SCORE.CLASS_SCORE 'softmax'): a softmax over one class is exactly 1.0 for every region, "
        "whatever the model sees. Add the other classes the images contain, or a generic entry such as "
        "'background' or 'object', or score each class on its own with class_score='sigmoid' "
        "(MODEL.REGIONSPOT.SCORE.CLASS_SCORE 'sigmoid')."
    )


def vocabulary_from_config(cfg, required: bool = True) -> List[str]:
    """
    Class names the config asks for: a custom list or the first test (else train) dataset's.
    With ``required=False`` a config naming no dataset gives an empty list (set it later).
    """
    rs = cfg.MODEL.REGIONSPOT
    if rs.VOCAB.SOURCE == "custom":
        if not rs.VOCAB.CUSTOM:
            raise ValueError("MODEL.REGIONSPOT.VOCAB.SOURCE is 'custom' but VOCAB.CUSTOM is empty.")
        return list(rs.VOCAB.CUSTOM)
    if rs.VOCAB.SOURCE != "dataset":
        raise ValueError(f"MODEL.REGIONSPOT.VOCAB.SOURCE={rs.VOCAB.SOURCE!r}: use 'dataset' or 'custom'.")
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        if not required:
            return []
        raise ValueError(
            "MODEL.REGIONSPOT.VOCAB.SOURCE is 'dataset' but DATASETS.TEST and DATASETS.TRAIN are empty; "
            "name a dataset or set VOCAB.SOURCE='custom' with VOCAB.CUSTOM."
        )
    # Also for datasets registered the standard way (register_coco_instances), whose metadata gets
    # thing_classes only when the dataset is loaded: read from the json's categories.
    from ..data.multi_dataset import dataset_class_names

    return dataset_class_names(names[0])


class ZeroShotClassifier(nn.Module):
    """
    Scores region embeddings against the text embeddings of a vocabulary.

    ``forward(region_embeddings, vocabulary=None)`` gives [..., C] scaled cosine logits against the
    current vocabulary (:meth:`set_vocabulary`) or a named one (:meth:`add_vocabulary`);
    :meth:`class_scores` turns logits into scores.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        logit_scale: torch.Tensor,
        text_encoder: Optional[Callable[[List[str]], torch.Tensor]] = None,
        class_score: str = "softmax",
        class_names: Sequence[str] = (),
    ):
        """
        Args:
            embed_dim: D_t, the width of the joint image-text space.
            logit_scale: 0-d tensor multiplying the cosines (CLIP's exp(logit_scale)).
            text_encoder: class names -> [C, D_t] L2-normalised text embeddings; used when
                :meth:`set_vocabulary` / :meth:`add_vocabulary` get names without embeddings.
            class_score: "softmax" over the vocabulary (the authors' evaluation) or "sigmoid" of
                each class on its own (see :meth:`class_scores`).
            class_names: initial vocabulary (may be empty; see :meth:`set_vocabulary`).
        """
        super().__init__()
        if class_score not in CLASS_SCORES:
            raise ValueError(f"MODEL.REGIONSPOT.SCORE.CLASS_SCORE={class_score!r}: use one of {CLASS_SCORES}.")
        self.embed_dim = int(embed_dim)
        self.class_score = class_score
        # A plain attribute, not a sub-module: the encoder (CLIP's text tower and its cache) belongs
        # to the frozen CLIP adapter, which is held and kept out of checkpoints by the head.
        self.text_encoder = text_encoder
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).clone(), False)
        self.register_buffer("text_embeddings", torch.zeros(0, self.embed_dim), False)
        self.class_names: List[str] = []
        # Named vocabularies of training datasets: key -> (class names, [C, D_t] embeddings).
        self.vocabularies: Dict[str, Tuple[List[str], torch.Tensor]] = {}
        if class_names:
            self.set_vocabulary(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _encode(self, class_names: List[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError(
                "This classifier has no text encoder: give the [C, D_t] text embeddings of the names."
            )
        return self.text_encoder(class_names)

    def set_vocabulary(self, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None) -> None:
        """
        Use a new vocabulary from now on.

        The names are checked by :func:`~regionspot.modeling.text_embeddings.validate_class_names`
        (None, empty, non-str and repeated names are refused; integers are converted with a
        warning). A one-class vocabulary is accepted, with a logged warning when class scores are a
        softmax (every score is then 1.0): evaluation protocols such as ODinW-13 include one-class
        datasets, where AP then measures the boxes alone. :class:`RegionSpotPredictor` refuses it.

        Args:
            class_names: C names; ``pred_classes`` index into them.
            embeddings: [C, D_t] L2-normalised, finite text embeddings; default: encoded with
                ``text_encoder`` (the prompt ensemble, read from the on-disk cache when present).

        Raises:
            ValueError: bad names or embeddings (the message names them and the fix).
        """
        class_names = validate_class_names(class_names)
        if embeddings is None:
            embeddings = self._encode(class_names)
        embeddings = check_text_embeddings(embeddings, len(class_names), self.embed_dim)
        if len(class_names) == 1 and self.class_score == "softmax":
            logger.warning(
                single_class_softmax_message(class_names[0]) + " In evaluation this makes AP a measure of the "
                "boxes alone (with GT boxes as prompts, 100 whatever the model)."
            )
        self.class_names = class_names
        self.text_embeddings = embeddings.to(self.text_embeddings.device, torch.float32)

    def add_vocabulary(self, key: str, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None) -> None:
        """
        Register a named vocabulary (e.g. a training dataset's), used when a batch names it; the
        current vocabulary of :meth:`set_vocabulary` is unchanged.

        Args:
            key: the name batches refer to it by (the dataset's name).
            class_names: C names, checked as in :meth:`set_vocabulary` (the sigmoid focal loss
                scores each class on its own, so one class is fine here).
            embeddings: [C, D_t] L2-normalised, finite text embeddings; default: encoded.

        Raises:
            ValueError: bad key, names or embeddings.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"add_vocabulary: key must be a non-empty str (the dataset's name), got {key!r}.")
        class_names = validate_class_names(class_names, f"the vocabulary {key!r}")
        if embeddings is None:
            embeddings = self._encode(class_names)
        embeddings = check_text_embeddings(embeddings, len(class_names), self.embed_dim, f"embeddings of {key!r}")
        self.vocabularies[key] = (class_names, embeddings)

    def embeddings(self, vocabulary: Optional[str] = None) -> torch.Tensor:
        """[C, D_t] text embeddings of the current vocabulary, or of the named one."""
        if vocabulary is None:
            if self.num_classes == 0:
                raise RuntimeError(
                    "No vocabulary: name a dataset in DATASETS.TEST, set MODEL.REGIONSPOT.VOCAB.SOURCE="
                    "'custom' with VOCAB.CUSTOM, or call set_vocabulary(class_names)."
                )
            return self.text_embeddings
        if vocabulary not in self.vocabularies:
            raise KeyError(
                f"A batch names vocabulary {vocabulary!r}, which the model does not have; known: "
                f"{sorted(self.vocabularies)}. Register it with add_vocabulary()."
            )
        names, emb = self.vocabularies[vocabulary]
        device = self.text_embeddings.device
        if emb.device != device:  # moved once, after the model moved
            emb = emb.to(device)
            self.vocabularies[vocabulary] = (names, emb)
        return emb

    def forward(self, region_embeddings: torch.Tensor, vocabulary: Optional[str] = None) -> torch.Tensor:
        """
        [..., D_t] region embeddings -> [..., C] scaled cosine logits against the current
        vocabulary, or against the named one registered with :meth:`add_vocabulary`.
        """
        return region_text_logits(region_embeddings, self.embeddings(vocabulary), self.logit_scale)


    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """
        [..., C] logits -> [..., C] class scores, as ``class_score`` says.

        "softmax" (default, the authors' evaluation): probabilities over the vocabulary, summing
        to 1, so a class's score depends on which other classes are in the vocabulary, and a
        one-class vocabulary scores every region 1.0.

        "sigmoid": ``sigmoid(logit)`` of each class on its own, independent of the other classes
        (so a one-class vocabulary is meaningful). It is the quantity the sigmoid focal loss of
        training fits on these same logits, but it is not the authors' evaluation and gives other
        APs, and whether it is informative depends on the weights: the logits are ``logit_scale``
        x cosine with no bias, and at CLIP's logit scale of 100 the cosines typical of raw CLIP
        image-text pairs (~0.2-0.35) would give sigmoid(20..35), i.e. 1.0 for every class. In
        float32, sigmoid is exactly 1.0 from a logit of ~17 on, so such regions tie. Look at the
        logits of your weights before relying on it (not measured on the released checkpoints).
        """
        if self.class_score == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)
