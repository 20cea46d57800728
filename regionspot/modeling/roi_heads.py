"""
``RegionSpotROIHeads``: an ROI-style head that recognises given regions.

Each region (a proposal box, a GT box, or point clicks) is turned into a SAM token, fused with the
image's CLIP feature map by :class:`RegionSpotFusion`, and scored against the class text
embeddings of the current vocabulary. It follows detectron2's ROI-head contract, so it runs
behind any proposal source, inside the ``RegionSpot`` meta-architecture or a ``GeneralizedRCNN``.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances

from .clip_features import ClipDenseFeatures, build_clip
from .frozen import keep_out_of_checkpoints
from .fusion import RegionSpotFusion, region_text_logits
from .input_checks import check_boxes, check_points, check_text_embeddings, describe_empty_boxes
from .masks import MASK_RESIZE_MODES, SamMasks
from .sam_tokens import SamImageState, SamRegionTokens, build_sam
from .text_embeddings import PROMPT_TEMPLATES, TextEmbeddingCache, validate_class_names

logger = logging.getLogger(__name__)

__all__ = ["RegionSpotROIHeads", "images_to_rgb_uint8", "select_detections", "vocabulary_from_config"]

SCORING_MODES = ("topk_pairs", "per_region")
BOX_SCORE_ORDERS = ("after_topk", "before_topk")
# How a region's logits become class scores: "softmax" over the vocabulary (the authors'), or
# "sigmoid" of each class's logit on its own (the quantity the focal loss trains).
CLASS_SCORES = ("softmax", "sigmoid")


def single_class_softmax_message(class_name: str) -> str:
    """Why a one-class vocabulary with softmax scores says nothing, and what to do instead."""
    return (
        f"The vocabulary has one class ({class_name!r}) and class scores are a softmax over the vocabulary "
        "(MODEL.REGIONSPOT.CLASS_SCORE 'softmax'): a softmax over one class is exactly 1.0 for every region, "
        "whatever the model sees. Add the other classes the images contain, or a generic entry such as "
        "'background' or 'object', or score each class on its own with class_score='sigmoid' "
        "(MODEL.REGIONSPOT.CLASS_SCORE 'sigmoid')."
    )


def vocabulary_from_config(cfg, required: bool = True) -> List[str]:
    """
    Class names the config asks for: a custom list or the first test (else train) dataset's.
    With ``required=False`` a config naming no dataset gives an empty list (set it later).
    """
    rs = cfg.MODEL.REGIONSPOT
    if rs.VOCABULARY == "custom":
        if not rs.CUSTOM_VOCABULARY:
            raise ValueError("MODEL.REGIONSPOT.VOCABULARY is 'custom' but CUSTOM_VOCABULARY is empty.")
        return list(rs.CUSTOM_VOCABULARY)
    if rs.VOCABULARY != "dataset":
        raise ValueError(f"MODEL.REGIONSPOT.VOCABULARY={rs.VOCABULARY!r}: use 'dataset' or 'custom'.")
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        if not required:
            return []
        raise ValueError(
            "MODEL.REGIONSPOT.VOCABULARY is 'dataset' but DATASETS.TEST and DATASETS.TRAIN are empty; "
            "name a dataset or set VOCABULARY='custom' with CUSTOM_VOCABULARY."
        )
    # Also for datasets registered the standard way (register_coco_instances), whose metadata gets
    # thing_classes only when the dataset is loaded: read from the json's categories.
    from ..data.multi_dataset import dataset_class_names

    return dataset_class_names(names[0])


def images_to_rgb_uint8(
    images: ImageList, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, input_format: str
) -> List[np.ndarray]:
    """Each image of a normalised, padded batch as [h, w, 3] uint8 RGB numpy, cropped to its size."""
    out = []
    for i, (h, w) in enumerate(images.image_sizes):
        x = images.tensor[i, :, :h, :w] * pixel_std.to(images.tensor) + pixel_mean.to(images.tensor)
        if input_format == "BGR":
            x = x.flip(0)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    return out


def select_detections(
    probs: torch.Tensor,
    box_scores: Optional[torch.Tensor],
    mode: str,
    topk: int,
    max_detections: int,
    score_thresh: float,
    box_score_order: str = "after_topk",
    valid_regions: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Turn region x class probabilities into detections.

    Args:
        probs: [N, C] class probabilities of N regions.
        box_scores: [N] scores of the boxes themselves (multiplied in), or None.
        mode: "topk_pairs" (best ``topk`` (region, class) pairs, a region may repeat) or
            "per_region" (each region with its best class).
        topk: k of "topk_pairs".
        max_detections: cap after selection (``TEST.DETECTIONS_PER_IMAGE``); <= 0 for none.
        score_thresh: minimum score.
        box_score_order: with ``box_scores`` in "topk_pairs": "after_topk" takes the top ``topk``
            pairs by class probability, then multiplies by the box score (the authors'
            evaluation); "before_topk" takes the top ``topk`` pairs of the product.
        valid_regions: [N] bool; pairs of other regions are dropped after the top-k and before
            the cap (as the authors drop detections whose clipped box is empty before LVIS keeps
            the best 300 of an image).

    Returns:
        region indices [K], class indices [K], scores [K], sorted by descending score.
    """
    if box_score_order not in BOX_SCORE_ORDERS:
        raise ValueError(f"MODEL.REGIONSPOT.BOX_SCORE_ORDER={box_score_order!r}: use one of {BOX_SCORE_ORDERS}.")
    after_topk = mode == "topk_pairs" and box_scores is not None and box_score_order == "after_topk"
    scores = probs if box_scores is None or after_topk else probs * box_scores[:, None]
    num_classes = scores.shape[1]
    if mode == "topk_pairs":
        k = min(topk, scores.numel())
        top, flat = scores.flatten().topk(k)
        regions, classes = flat // num_classes, flat % num_classes
        if after_topk:
            top = top * box_scores[regions]
            # Stable, so pairs of equal score keep the order of their class probabilities.
            top, order = top.sort(descending=True, stable=True)
            regions, classes = regions[order], classes[order]
    elif mode == "per_region":
        top, classes = scores.max(dim=1) if scores.shape[0] else (scores.new_zeros(0), scores.new_zeros(0, dtype=torch.long))
        order = top.argsort(descending=True)
        top, classes, regions = top[order], classes[order], order
    else:
        raise ValueError(f"MODEL.REGIONSPOT.SCORING={mode!r}: use one of {SCORING_MODES}.")
    keep = top > score_thresh
    if valid_regions is not None:
        keep &= valid_regions[regions]
    regions, classes, top = regions[keep], classes[keep], top[keep]
    if max_detections > 0:
        regions, classes, top = regions[:max_detections], classes[:max_detections], top[:max_detections]
    return regions, classes, top


def _check_batch_length(images: ImageList, per_image: Sequence, name: str) -> None:
    # zip() would silently drop the images (or region sets) beyond the shorter list.
    if len(per_image) != len(images.image_sizes):
        raise ValueError(
            f"{len(images.image_sizes)} images but {len(per_image)} {name}: give one entry per image, in order."
        )


@ROI_HEADS_REGISTRY.register()
class RegionSpotROIHeads(nn.Module):
    """
    Recognise given regions with frozen SAM + CLIP and a trained fusion module.

    ``forward(images, features, proposals, targets)`` follows detectron2's ROI-head contract.
    ``images`` must carry the pixels (SAM and CLIP look at the image itself; backbone
    ``features`` are not used): each image is un-normalised with the model's pixel mean/std and
    converted from ``INPUT.FORMAT`` to RGB. Regions are ``proposal_boxes`` of ``proposals`` (their
    ``objectness_logits`` give box scores), optionally with ``point_coords`` / ``point_labels``
    for click prompts.
    """

    @configurable
    def __init__(
        self,
        *,
        sam: SamRegionTokens,
        clip: ClipDenseFeatures,
        fusion: RegionSpotFusion,
        class_names: Sequence[str] = (),
        pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        input_format: str = "RGB",
        scoring: str = "topk_pairs",
        topk: int = 900,
        detections_per_image: int = 300,
        score_thresh: float = 0.0,
        use_box_scores: bool = True,
        mask_on: bool = True,
        prompt_chunk_size: int = 32,
        mask_second_pass_min_prompts: int = 0,
        box_score_order: str = "after_topk",
        mask_resize: str = "fixed",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        text_cache: Optional[TextEmbeddingCache] = None,
        text_batch_size: int = 256,
        class_score: str = "softmax",
    ):
        """
        Args:
            sam, clip: the frozen adapters.
            fusion: the trainable module.
            class_names: initial vocabulary (may be empty; see :meth:`set_vocabulary`).
            pixel_mean, pixel_std, input_format: how ``images`` were normalised.
            scoring, topk, detections_per_image, score_thresh: see :func:`select_detections`.
            use_box_scores: multiply probabilities by sigmoid(``objectness_logits``) when present.
            mask_on: predict SAM masks.
            prompt_chunk_size: prompts decoded by SAM at once.
            mask_second_pass_min_prompts: from this many prompts on, masks are decoded again for
                the surviving regions only instead of kept for all (0: never).
            box_score_order: see :func:`select_detections`.
            mask_resize: how masks of a resized test image reach the original size (see
                :class:`SamMasks`): "authors" or "fixed".
            focal_alpha, focal_gamma: training loss.
            text_cache: cache of vocabulary embeddings.
            text_batch_size: sentences per text-tower forward.
            class_score: how logits become class scores (see :meth:`class_scores`): "softmax" over
                the vocabulary (the authors' evaluation) or "sigmoid" of each class on its own.
        """
        super().__init__()
        if scoring not in SCORING_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.SCORING={scoring!r}: use one of {SCORING_MODES}.")
        if box_score_order not in BOX_SCORE_ORDERS:
            raise ValueError(f"MODEL.REGIONSPOT.BOX_SCORE_ORDER={box_score_order!r}: use one of {BOX_SCORE_ORDERS}.")
        if mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE={mask_resize!r}: use one of {MASK_RESIZE_MODES}.")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={input_format!r}: RegionSpot reads RGB or BGR images.")
        if class_score not in CLASS_SCORES:
            raise ValueError(f"MODEL.REGIONSPOT.CLASS_SCORE={class_score!r}: use one of {CLASS_SCORES}.")
        self.class_score = class_score
        self.sam = sam
        self.clip = clip
        self.fusion = fusion
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("logit_scale", clip.logit_scale.clone(), False)
        self.register_buffer("text_embeddings", torch.zeros(0, clip.embed_dim), False)
        self.input_format = input_format
        self.scoring = scoring
        self.topk = topk
        self.detections_per_image = detections_per_image
        self.score_thresh = score_thresh
        self.use_box_scores = use_box_scores
        self.mask_on = mask_on
        self.prompt_chunk_size = prompt_chunk_size
        self.mask_second_pass_min_prompts = mask_second_pass_min_prompts
        self.box_score_order = box_score_order
        self.mask_resize = mask_resize
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.text_cache = text_cache or TextEmbeddingCache()
        self.text_batch_size = text_batch_size
        self.class_names: List[str] = []
        # Named vocabularies of training datasets: key -> (class names, [C, D_t] embeddings).
        self.vocabularies: Dict[str, Tuple[List[str], torch.Tensor]] = {}
        if class_names:
            self.set_vocabulary(class_names)

        # Checkpoints hold the fusion module only; SAM and CLIP come from their own files.
        keep_out_of_checkpoints(self, "sam", "clip")

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        rs = cfg.MODEL.REGIONSPOT
        # On MODEL.DEVICE already: the vocabulary's text embeddings are encoded in __init__, before
        # build_model moves the whole model there.
        device = torch.device(cfg.MODEL.DEVICE)
        sam = SamRegionTokens(
            build_sam(rs.SAM.TYPE, rs.SAM.WEIGHTS, rs.RANDOM_INIT_FROZEN, rs.RANDOM_INIT_SEED),
            fast=rs.SAM.FAST_PATH,
        ).set_precision(rs.FROZEN_PRECISION).to(device)
        clip = ClipDenseFeatures(
            build_clip(rs.CLIP.TYPE, rs.CLIP.WEIGHTS, rs.RANDOM_INIT_FROZEN, rs.RANDOM_INIT_SEED + 1),
            rs.CLIP.INPUT_SIZE,
            antialias=rs.CLIP.RESIZE_ANTIALIAS,
        ).set_precision(rs.FROZEN_PRECISION).to(device)
        fusion = RegionSpotFusion(
            token_dim=sam.token_dim,
            clip_dim=clip.width,
            embed_dim=clip.embed_dim,
            num_layers=rs.DECODER.NUM_LAYERS,
            num_heads=rs.DECODER.NUM_HEADS,
            dim_feedforward=rs.DECODER.DIM_FEEDFORWARD,
            dropout=rs.DECODER.DROPOUT,
        )
        return {
            "sam": sam,
            "clip": clip,
            "fusion": fusion,
            "class_names": vocabulary_from_config(cfg, required=False),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "scoring": rs.SCORING,
            "topk": rs.TOPK,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "score_thresh": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "use_box_scores": rs.USE_BOX_SCORES,
            "mask_on": rs.MASK_ON,
            "prompt_chunk_size": rs.PROMPT_CHUNK_SIZE,
            "mask_second_pass_min_prompts": rs.MASK_SECOND_PASS_MIN_PROMPTS,
            "box_score_order": rs.BOX_SCORE_ORDER,
            "mask_resize": rs.PROTOCOL.MASK_RESIZE,
            "focal_alpha": rs.FOCAL_ALPHA,
            "focal_gamma": rs.FOCAL_GAMMA,
            "text_cache": TextEmbeddingCache(rs.TEXT_CACHE_DIR or None),
            "text_batch_size": rs.TEXT_BATCH_SIZE,
            # Read with a default so configs made before the key existed keep the authors' softmax.
            "class_score": rs.CLASS_SCORE,
        }

    # ----------------------------------------------------------------------------------------
    # Vocabulary
    def set_vocabulary(self, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None):
        """
        Use a new vocabulary from now on.

        The names are checked by :func:`~regionspot.modeling.text_embeddings.validate_class_names`
        (None, empty, non-str and repeated names are refused; integers are converted with a
        warning). A one-class vocabulary is accepted, with a logged warning when class scores are a
        softmax (every score is then 1.0): evaluation protocols such as ODinW-13 include one-class
        datasets, where AP then measures the boxes alone. :class:`RegionSpotPredictor` refuses it.

        Args:
            class_names: C names; ``pred_classes`` index into them.
            embeddings: [C, D_t] L2-normalised, finite text embeddings; default: encoded with the
                prompt ensemble (read from the on-disk cache when present).

        Raises:
            ValueError: bad names or embeddings (the message names them and the fix).
        """
        class_names = validate_class_names(class_names)
        if embeddings is None:
            embeddings = self.text_cache.get(self.clip, class_names, PROMPT_TEMPLATES, self.text_batch_size)
        embeddings = check_text_embeddings(embeddings, len(class_names), self.clip.embed_dim)
        if len(class_names) == 1 and self.class_score == "softmax":
            logger.warning(
                single_class_softmax_message(class_names[0]) + " In evaluation this makes AP a measure of the "
                "boxes alone (with GT boxes as prompts, 100 whatever the model)."
            )
        self.class_names = class_names
        self.text_embeddings = embeddings.to(self.pixel_mean.device, torch.float32)

    def add_vocabulary(self, key: str, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None):
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
            embeddings = self.text_cache.get(self.clip, class_names, PROMPT_TEMPLATES, self.text_batch_size)
        embeddings = check_text_embeddings(embeddings, len(class_names), self.clip.embed_dim, f"embeddings of {key!r}")
        self.vocabularies[key] = (class_names, embeddings)

    def _embeddings(self, vocabulary: Optional[str]) -> torch.Tensor:
        if vocabulary is None:
            if self.num_classes == 0:
                raise RuntimeError(
                    "No vocabulary: name a dataset in DATASETS.TEST, set MODEL.REGIONSPOT.VOCABULARY="
                    "'custom' with CUSTOM_VOCABULARY, or call set_vocabulary(class_names)."
                )
            return self.text_embeddings
        if vocabulary not in self.vocabularies:
            raise KeyError(
                f"A batch names vocabulary {vocabulary!r}, which the model does not have; known: "
                f"{sorted(self.vocabularies)}. Register it with add_vocabulary()."
            )
        names, emb = self.vocabularies[vocabulary]
        if emb.device != self.pixel_mean.device:  # moved once, after the model moved
            emb = emb.to(self.pixel_mean.device)
            self.vocabularies[vocabulary] = (names, emb)
        return emb

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ----------------------------------------------------------------------------------------
    # Per-image building blocks (shared by forward and the predictor)
    def image_to_rgb_uint8(self, image: torch.Tensor) -> np.ndarray:
        """[3, H, W] normalised tensor in ``input_format`` -> [H, W, 3] uint8 RGB numpy."""
        return self.images_to_rgb_uint8(ImageList(image[None], [tuple(image.shape[-2:])]))[0]

    def images_to_rgb_uint8(self, images: ImageList) -> List[np.ndarray]:
        """The batch's images un-normalised, as [h, w, 3] uint8 RGB numpy cropped to their sizes."""
        return images_to_rgb_uint8(images, self.pixel_mean, self.pixel_std, self.input_format)

    def encode_image(self, image: np.ndarray) -> Tuple[SamImageState, torch.Tensor]:
        """
        Args:
            image: [H, W, 3] uint8 RGB.

        Returns:
            SAM's image state and CLIP's [1, L, D_v] feature map.
        """
        state = self.sam.encode_image(image)
        features = self.clip.dense_features(self.clip.image_to_tensor(image))
        return state, features

    def encode_images(
        self, images: Sequence[np.ndarray], sam_states: Optional[Sequence[SamImageState]] = None
    ) -> Tuple[List[SamImageState], torch.Tensor]:
        """
        Several images through each frozen encoder in one batch.

        Args:
            images: [H_i, W_i, 3] uint8 RGB images.
            sam_states: SAM's states of these images when already computed by ``self.sam.encode_images``
                on the same images (e.g. by ``SamAutomaticProposals`` on this head's SAM): SAM's image
                encoder is then not run again, only CLIP's.

        Returns:
            SAM's image states and CLIP's [B, L, D_v] feature maps.

        Raises:
            ValueError: ``sam_states`` are not one per image, or one was made from an image of another size.
        """
        if sam_states is None and len(images) == 1:
            state, features = self.encode_image(images[0])
            return [state], features
        if sam_states is None:
            sam_states = self.sam.encode_images(images)
        else:
            sam_states = list(sam_states)
            if len(sam_states) != len(images):
                raise ValueError(f"{len(images)} images but {len(sam_states)} sam_states: give one per image, in order.")
            for i, (state, image) in enumerate(zip(sam_states, images)):
                if tuple(state.original_size) != tuple(image.shape[:2]):
                    raise ValueError(
                        f"sam_states[{i}] was encoded from a {tuple(state.original_size)} image, image {i} is "
                        f"{tuple(image.shape[:2])}: the states must be those of these images, in order."
                    )
        # One image through this path gives exactly encode_image's CLIP features (the same operations).
        clip_views = [self.clip.preprocess(self.clip.image_to_tensor(im)) for im in images]
        return sam_states, self.clip.dense_features(torch.cat(clip_views), preprocessed=True)

    def region_embeddings(self, tokens: torch.Tensor, clip_features: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """[B, N, token_dim] tokens + [B, L, D_v] features -> [B, N, D_t] region embeddings."""
        return self.fusion(tokens, clip_features, padding_mask)

    def logits(self, region_embeddings: torch.Tensor, vocabulary: Optional[str] = None) -> torch.Tensor:
        """
        [..., D_t] -> [..., C] scaled cosine logits against the current vocabulary, or against the
        named one registered with :meth:`add_vocabulary`.
        """
        return region_text_logits(region_embeddings, self._embeddings(vocabulary), self.logit_scale)

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

    # ----------------------------------------------------------------------------------------
    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
        sam_states: Optional[List[SamImageState]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """
        Args:
            images: the batch's pixels (normalised with ``pixel_mean``/``pixel_std``).
            features: unused (RegionSpot reads the image itself).
            proposals: per image, ``proposal_boxes`` (XYXY in ``images`` pixels) and optionally
                ``objectness_logits``, ``point_coords`` [N, P, 2], ``point_labels`` [N, P].
            targets: per image, ``gt_boxes`` and ``gt_classes`` (training).
            sam_states: inference only: per image, SAM's state of that image when already encoded
                with this head's SAM (``SamAutomaticProposals.propose_with_image_states`` returns the
                states its proposals came from), so SAM's image encoder does not run again; None:
                SAM encodes the images here (see :meth:`encode_images`).

        Returns:
            At inference, per image Instances with ``pred_boxes``, ``scores``, ``pred_classes``
            and (``mask_on``) ``pred_masks`` as :class:`SamMasks`, which detectron2's
            ``detector_postprocess`` turns into [K, H, W] bool masks; in training, an empty list and
            ``{"loss_region_cls": ...}``.

        Raises:
            ValueError: a proposal box or point prompt is refused by :meth:`check_regions` (checked
                for every image before any image is encoded), the numbers of images and
                proposal sets (or ``sam_states``) differ, or a state is of an image of another size.
        """
        del features
        if self.training:
            assert targets is not None, "RegionSpotROIHeads needs targets in training."
            return [], self.losses(images, targets)
        _check_batch_length(images, proposals, "proposals")
        if sam_states is not None:
            _check_batch_length(images, sam_states, "sam_states")
        for i, (size, props) in enumerate(zip(images.image_sizes, proposals)):
            self.check_regions(props, tuple(size), f"of image {i} of the batch")
        rgbs = self.images_to_rgb_uint8(images)
        states, clip_features = self.encode_images(rgbs, sam_states) if rgbs else ([], None)
        results = [
            self.recognize(
                rgb, props, encoded=(states[i], clip_features[i : i + 1]), where=f"of image {i} of the batch"
            )
            for i, (rgb, props) in enumerate(zip(rgbs, proposals))
        ]
        return results, {}

    def forward_with_given_boxes(self, images: ImageList, instances: List[Instances]) -> List[Instances]:
        """
        Classify known boxes (``pred_boxes``): one output per given box, in the given order.

        Given boxes are checked by :meth:`check_regions` before any image is encoded: NaN/inf and
        inverted boxes are refused. A box that is empty once clipped to the image (zero width or
        height, or entirely outside it) is kept, because the output has one entry per given box:
        it is scored like the others (and, as the regions attend to each other, takes part in the
        others' scores, as in the authors' model), a warning names it, and the output's
        ``empty_box`` field is True for it, so callers can drop or ignore it.

        Args:
            images: the batch's pixels (normalised with ``pixel_mean``/``pixel_std``).
            instances: per image, ``pred_boxes`` XYXY in ``images`` pixels.

        Returns:
            per image Instances as :meth:`recognize` with ``per_region=True`` (``empty_box`` included).

        Raises:
            ValueError: a refused box, or the numbers of images and instance sets differ.
        """
        _check_batch_length(images, instances, "detected_instances")
        regions = []
        for i, (size, inst) in enumerate(zip(images.image_sizes, instances)):
            props = Instances(inst.image_size)
            props.proposal_boxes = inst.pred_boxes
            self.check_regions(props, tuple(size), f"of image {i} of the batch", box_field="pred_boxes")
            regions.append(props)
        return [
            self.recognize(rgb, props, per_region=True, where=f"of image {i} of the batch", box_field="pred_boxes")
            for i, (rgb, props) in enumerate(zip(self.images_to_rgb_uint8(images), regions))
        ]

    def check_regions(
        self, regions: Instances, image_size: Tuple[int, int], where: str = "", box_field: str = "proposal_boxes"
    ) -> Optional[torch.Tensor]:
        """
        Check the prompts of one image before anything is computed with them.

        Refused (``ValueError`` naming the field, the image and the rows): NaN/inf or inverted
        boxes (:func:`~regionspot.modeling.input_checks.check_boxes`), bad point prompts
        (:func:`~regionspot.modeling.input_checks.check_points`: shapes, labels outside
        {-1, 0, 1}, points outside the image, ...), NaN ``objectness_logits`` (±inf is fine: its
        sigmoid is exactly 1 or 0). Boxes that are empty once clipped to the image are not refused:
        their mask is returned, and each caller decides (see :meth:`recognize`).

        Args:
            regions: ``proposal_boxes`` and optional ``objectness_logits``, ``point_coords``,
                ``point_labels``.
            image_size: (H, W) of the image the prompts refer to.
            where: appended to the field names in messages, e.g. "of image 2 of the batch".
            box_field: how the boxes are called in messages.

        Returns:
            [N] bool, True where a box is empty once clipped to the image; None without boxes.
        """
        suffix = f" {where}" if where else ""
        empty = None
        num_boxes = None
        if regions.has("proposal_boxes"):
            boxes = regions.proposal_boxes.tensor
            _, empty = check_boxes(boxes, image_size, f"{box_field}{suffix}")
            num_boxes = len(boxes)
        points = regions.point_coords if regions.has("point_coords") else None
        labels = regions.point_labels if regions.has("point_labels") else None
        check_points(points, labels, image_size, num_boxes, f"point_coords{suffix}")
        if regions.has("objectness_logits"):
            nan = torch.isnan(regions.objectness_logits)
            if bool(nan.any()):
                rows = nan.nonzero().flatten().tolist()
                raise ValueError(
                    f"objectness_logits{suffix} are NaN at rows {rows[:10]}: a box score must be a number "
                    "(a proposal file's scores are probabilities p, stored as logit(p)); fix or drop those rows."
                )
        return empty

    @torch.no_grad()
    def recognize(
        self,
        image: np.ndarray,
        regions: Instances,
        per_region: bool = False,
        encoded=None,
        where: str = "",
        box_field: str = "proposal_boxes",
    ) -> Instances:
        """
        Recognise the regions of one image.

        The prompts are checked first (:meth:`check_regions`: NaN/inf or inverted boxes and bad
        point prompts are refused). Boxes that are empty once clipped to the image (zero width or
        height, or entirely outside it) stay prompts in both modes, because the regions of an image
        attend to each other and the authors keep every box:

        * detections (``per_region=False``, the evaluation path): their detections are dropped
          after scoring, before the ``detections_per_image`` cap (the authors' protocol);
        * ``per_region=True`` (given boxes): they are returned, scored, with ``empty_box`` True and a
          logged warning naming them.

        Partly-outside boxes are used as they are (SAM encodes any coordinate).

        Args:
            image: [H, W, 3] uint8 RGB.
            regions: ``proposal_boxes`` and optional ``objectness_logits``, ``point_coords``,
                ``point_labels`` (N regions).
            per_region: one detection per region in the given order (no top-k, no threshold).
            encoded: the image's (SAM state, [1, L, D_v] CLIP features) when already computed.
            where: appended to field names in messages, e.g. "of image 2 of the batch".
            box_field: how the boxes are called in messages.

        Returns:
            Instances of size (H, W) with ``pred_boxes``, ``scores`` (see :meth:`class_scores`),
            ``pred_classes``, ``mask_scores``, with ``per_region`` also ``empty_box`` [N] bool, and,
            if ``mask_on``, ``pred_masks`` as :class:`SamMasks` (call ``to_bitmasks(None, H, W)``;
            detectron2's ``detector_postprocess`` does).

        Raises:
            ValueError: a refused prompt (see :meth:`check_regions`).
        """
        image_size = tuple(image.shape[:2])
        empty = self.check_regions(regions, image_size, where, box_field)
        if per_region and empty is not None and bool(empty.any()):
            logger.warning(
                describe_empty_boxes(regions.proposal_boxes.tensor, empty, image_size, f"{box_field} {where}".strip())
                + " They are scored like the others, but their scores describe no image content; their "
                "output's empty_box field is True."
            )
        elif empty is not None and bool(empty.any()):
            # The authors' protocol: prompts like the others, their detections dropped after scoring.
            logger.debug(f"{int(empty.sum())} empty proposal boxes {where}: their detections are dropped.")
        state, clip_features = encoded if encoded is not None else self.encode_image(image)
        boxes = regions.proposal_boxes.tensor if regions.has("proposal_boxes") else None
        points = regions.point_coords if regions.has("point_coords") else None
        labels = regions.point_labels if regions.has("point_labels") else None
        num_prompts = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        second_pass = self.mask_on and 0 < self.mask_second_pass_min_prompts <= num_prompts
        sam_out = self.sam.decode_prompts(
            state, boxes, points, labels, with_masks=self.mask_on and not second_pass,
            chunk_size=self.prompt_chunk_size,
        )
        logits = self.logits(self.region_embeddings(sam_out.tokens[None], clip_features)[0])
        probs = self.class_scores(logits)
        box_scores = None
        if self.use_box_scores and regions.has("objectness_logits"):
            box_scores = regions.objectness_logits.to(probs).sigmoid()
        if per_region:
            scores, classes = probs.max(dim=1) if len(probs) else (probs.new_zeros(0), probs.new_zeros(0, dtype=torch.long))
            region_idx = torch.arange(len(probs), device=probs.device)
        else:
            valid = None
            if boxes is not None:  # detections whose box is empty once clipped to the image are dropped
                clipped = Boxes(boxes.to(probs.device).clone())
                clipped.clip(image_size)
                valid = clipped.nonempty()
            region_idx, classes, scores = select_detections(
                probs, box_scores, self.scoring, self.topk, self.detections_per_image, self.score_thresh,
                self.box_score_order, valid,
            )
        out = Instances(image_size)
        boxes_from_masks = boxes is None and self.mask_on
        # Point prompts only: the boxes of the predicted masks when masks are on (zeros otherwise).
        out_boxes = torch.zeros(len(probs), 4, device=probs.device) if boxes is None else boxes.to(probs.device)
        out.pred_boxes = Boxes(out_boxes[region_idx])
        out.scores = scores
        out.pred_classes = classes
        out.mask_scores = sam_out.mask_scores[region_idx]
        if per_region:
            no_box = torch.zeros(len(probs), dtype=torch.bool, device=probs.device)
            out.empty_box = (no_box if empty is None else empty.to(probs.device))[region_idx]
        if self.mask_on:
            # Kept lazily as SAM logits of the surviving regions only: each region's mask is
            # up-sampled once, at the output size, however many classes it was kept with.
            kept, index = torch.unique(region_idx, return_inverse=True)
            if second_pass:  # SAM decodes each prompt on its own: a subset gives the same masks
                low_res = self.sam.decode_prompts(
                    state,
                    None if boxes is None else boxes[kept],
                    None if points is None else points[kept],
                    None if labels is None else labels[kept],
                    with_masks=True,
                    chunk_size=self.prompt_chunk_size,
                ).low_res_masks
            else:
                low_res = sam_out.low_res_masks[kept]
            out.pred_masks = SamMasks(
                low_res, index, self.sam.sam, state.input_size, source_size=image_size, resize=self.mask_resize
            )
            if boxes_from_masks:
                out.pred_boxes = out.pred_masks.to_bitmasks(None, *image_size).get_bounding_boxes()
        return out

    # ----------------------------------------------------------------------------------------
    def losses(self, images: ImageList, targets: List[Instances], vocabulary: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """
        Sigmoid focal loss over the vocabulary (the current one, or the named one of the batch's
        dataset) for every GT region: summed over classes, averaged over an image's regions,
        summed over images. Images without boxes add zero.
        """
        _check_batch_length(images, targets, "targets")
        for i, (size, t) in enumerate(zip(images.image_sizes, targets)):
            # NaN boxes would make the loss NaN after hours of training; refuse them at once.
            check_boxes(t.gt_boxes.tensor, tuple(size), f"gt_boxes of image {i} of the batch")
        rgbs = self.images_to_rgb_uint8(images)
        states, clip_features = self.encode_images(rgbs)
        tokens = [
            self.sam.decode_prompts(state, t.gt_boxes.tensor, with_masks=False, chunk_size=self.prompt_chunk_size).tokens
            for state, t in zip(states, targets)
        ]
        labels = [t.gt_classes.to(clip_features.device) for t in targets]
        return {"loss_region_cls": self.loss_from_tokens(tokens, clip_features, labels, vocabulary)}

    def loss_from_tokens(
        self,
        tokens: List[torch.Tensor],
        clip_features: torch.Tensor,
        labels: List[torch.Tensor],
        vocabulary: Optional[str] = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens: per image [N_i, token_dim] SAM tokens (computed online or read from a cache).
            clip_features: [B, L, D_v].
            labels: per image [N_i] class indices into the vocabulary.
            vocabulary: name of a vocabulary of :meth:`add_vocabulary`; None for the current one.

        Returns:
            scalar focal loss.
        """
        counts = [len(t) for t in tokens]
        n_max = max(counts) if counts else 0
        batch = len(tokens)
        dim = self.sam.token_dim
        device = clip_features.device
        padded = torch.zeros(batch, max(n_max, 1), dim, device=device)
        tokens = [t.to(device=device, dtype=padded.dtype) for t in tokens]
        padding = torch.ones(batch, max(n_max, 1), dtype=torch.bool, device=device)
        for i, t in enumerate(tokens):
            padded[i, : len(t)] = t
            padding[i, : len(t)] = False
        # An image without regions still runs one (ignored) query so attention stays defined.
        padding[:, 0] &= torch.tensor([c > 0 for c in counts], device=device)
        logits = self.logits(self.region_embeddings(padded, clip_features.float(), padding), vocabulary)
        num_classes = logits.shape[-1]
        total = logits.sum() * 0.0
        for i, y in enumerate(labels):
            if counts[i] == 0:
                continue
            if (y < 0).any() or (y >= num_classes).any():
                raise ValueError(
                    f"gt_classes outside the vocabulary of {num_classes} classes; the batch's "
                    "dataset and the model's vocabulary disagree."
                )
            onehot = torch.nn.functional.one_hot(y.long(), num_classes).to(logits.dtype)
            loss = sigmoid_focal_loss(logits[i, : counts[i]], onehot, self.focal_alpha, self.focal_gamma, "none")
            total = total + loss.sum(dim=1).mean()
        return total
