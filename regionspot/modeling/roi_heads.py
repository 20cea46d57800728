"""
``RegionSpotROIHeads``: an ROI-style head that recognises given regions.

Each region (a proposal box, a GT box, or point clicks) is turned into a SAM token, fused with the
image's CLIP feature map by :class:`RegionSpotFusion`, and scored against the class text
embeddings of the current vocabulary. It follows detectron2's ROI-head contract, so it runs
behind any proposal source, inside the ``RegionSpot`` meta-architecture or a ``GeneralizedRCNN``.

The head composes named parts, each swappable by a subclass or through the constructor:

====================  ==================================================================
``sam``               the configured localizer (``MODEL.REGIONSPOT.LOCALIZER.NAME``, default
                      :class:`SamRegionTokens`): prompts -> region tokens, masks (frozen)
``clip``              the configured vision-language model (``MODEL.REGIONSPOT.VLM.NAME``, default
                      :class:`ClipDenseFeatures`): image -> dense feature map, text (frozen)
``fusion``            :class:`RegionSpotFusion`: tokens + feature map -> region embeddings
``classifier``        :class:`ZeroShotClassifier`: vocabulary, region embeddings -> logits
``selector``          :class:`DetectionSelector`: class scores -> detections
loss                  :func:`region_focal_loss` (``losses.py``)
====================  ==================================================================

The slots keep the names ``sam`` and ``clip`` whatever fills them (SAM 2.1, HQ-SAM, an OpenCLIP model:
see :mod:`regionspot.modeling.model_registry` for the two interfaces).
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances

from .clip_features import ClipDenseFeatures
from .frozen import keep_out_of_checkpoints
from .fusion import RegionSpotFusion
from .input_checks import check_boxes, check_region_prompts, describe_empty_boxes
from .losses import region_focal_loss
from .masks import MASK_RESIZE_MODES, SamMasks
from .pixels import PIXEL_FORMATS, as_rgb_tensor, image_hw, rgb_images
from .postprocessing import DetectionSelector
from .model_registry import build_localizer, build_vlm, frozen_pair
from .sam_tokens import SamImageState, SamRegionTokens
from .text_embeddings import PromptEnsembleEncoder, TextEmbeddingCache
from .zero_shot_classifier import ZeroShotClassifier, vocabulary_from_config

logger = logging.getLogger(__name__)

__all__ = ["RegionSpotROIHeads"]


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
    ``features`` are not used): a uint8 batch is read as RGB pixels (the ``RegionSpot`` and
    ``RegionSpotRelabel`` meta-architectures pass one, see :mod:`regionspot.modeling.pixels`); a
    floating-point batch (a ``GeneralizedRCNN``'s, normalised for its backbone) is un-normalised
    once with the head's ``pixel_mean``/``pixel_std`` and ``input_format``. Regions are
    ``proposal_boxes`` of ``proposals`` (their ``objectness_logits`` give box scores), optionally
    with ``point_coords`` / ``point_labels`` for click prompts.
    """

    @configurable
    def __init__(
        self,
        *,
        sam: SamRegionTokens,
        clip: ClipDenseFeatures,
        fusion: RegionSpotFusion,
        classifier: ZeroShotClassifier,
        selector: Optional[DetectionSelector] = None,
        use_box_scores: bool = True,
        mask_on: bool = True,
        mask_resize: str = "fixed",
        mask_second_pass_min_prompts: int = 0,
        prompt_chunk_size: int = 32,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        input_format: str = "RGB",
        object_score_as_box_score: bool = False,
    ):
        """
        Args:
            sam, clip: the frozen adapters: a localizer and a vision-language model (the interfaces of
                :mod:`regionspot.modeling.model_registry`; by default SAM and OpenAI CLIP).
            fusion: the trainable module.
            classifier: the vocabulary and the scoring of region embeddings against it.
            selector: class scores -> detections (top-k pairs or per region, cap, threshold);
                default :class:`DetectionSelector` with its defaults.
            use_box_scores: multiply probabilities by sigmoid(``objectness_logits``) when present.
            mask_on: predict SAM masks.
            mask_resize: how masks of a resized test image reach the original size (see
                :class:`SamMasks`): "authors" or "fixed".
            mask_second_pass_min_prompts: from this many prompts on, masks are decoded again for
                the surviving regions only instead of kept for all (0: never).
            prompt_chunk_size: prompts decoded by SAM at once.
            focal_alpha, focal_gamma: training loss (:func:`region_focal_loss`).
            pixel_mean, pixel_std, input_format: how a floating-point ``images`` batch (a
                detector's) was normalised; uint8 batches are RGB pixels and need none.
            object_score_as_box_score: regions without ``objectness_logits`` take sigmoid of the
                localizer's object score (SAM 2.1's) as their box score.
        """
        super().__init__()
        if mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"MODEL.REGIONSPOT.PROTOCOL.MASK_RESIZE={mask_resize!r}: use one of {MASK_RESIZE_MODES}.")
        if input_format not in PIXEL_FORMATS:
            raise ValueError(f"INPUT.FORMAT={input_format!r}: RegionSpot reads RGB or BGR images.")
        self.sam = sam
        self.clip = clip
        self.fusion = fusion
        self.classifier = classifier
        self.selector = selector if selector is not None else DetectionSelector()
        self.use_box_scores = use_box_scores
        self.mask_on = mask_on
        self.mask_resize = mask_resize
        self.mask_second_pass_min_prompts = mask_second_pass_min_prompts
        self.prompt_chunk_size = prompt_chunk_size
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.input_format = input_format
        self.object_score_as_box_score = bool(object_score_as_box_score)
        # Checkpoints hold the fusion module only; SAM and CLIP come from their own files.
        keep_out_of_checkpoints(self, "sam", "clip")

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        rs = cfg.MODEL.REGIONSPOT
        # On MODEL.DEVICE already: the vocabulary's text embeddings are encoded while building,
        # before build_model moves the whole model there.
        device = torch.device(cfg.MODEL.DEVICE)
        # The localizer and the vision-language model of LOCALIZER.NAME / VLM.NAME (SAM and OpenAI
        # CLIP from SAM.* / CLIP.* by default); the fusion module takes its widths from them.
        sam = build_localizer(cfg).to(device)
        clip = build_vlm(cfg).to(device)
        fusion = RegionSpotFusion(
            token_dim=sam.token_dim,
            clip_dim=clip.width,
            embed_dim=clip.embed_dim,
            num_layers=rs.DECODER.NUM_LAYERS,
            num_heads=rs.DECODER.NUM_HEADS,
            dim_feedforward=rs.DECODER.DIM_FEEDFORWARD,
            dropout=rs.DECODER.DROPOUT,
        )
        classifier = ZeroShotClassifier(
            embed_dim=clip.embed_dim,
            logit_scale=clip.logit_scale,
            text_encoder=PromptEnsembleEncoder(
                clip, TextEmbeddingCache(rs.VOCAB.CACHE_DIR or None), batch_size=rs.VOCAB.BATCH_SIZE
            ),
            class_score=rs.SCORE.CLASS_SCORE,
            class_names=vocabulary_from_config(cfg, required=False),
        )
        return {
            "sam": sam,
            "clip": clip,
            "fusion": fusion,
            "classifier": classifier,
            "selector": DetectionSelector.from_config(cfg),
            "use_box_scores": rs.SCORE.USE_BOX_SCORES,
            "mask_on": rs.MASK.ENABLED,
            "mask_resize": rs.PROTOCOL.MASK_RESIZE,
            "mask_second_pass_min_prompts": rs.MASK.SECOND_PASS_MIN_PROMPTS,
            "prompt_chunk_size": rs.SAM.PROMPT_CHUNK_SIZE,
            "focal_alpha": rs.LOSS.FOCAL_ALPHA,
            "focal_gamma": rs.LOSS.FOCAL_GAMMA,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "object_score_as_box_score": rs.LOCALIZER.OBJECT_SCORE_AS_BOX_SCORE,
        }

    @property
    def frozen_pair(self) -> Dict[str, str]:
        """Which localizer and vision-language model fill the ``sam`` and ``clip`` slots (recorded in checkpoints)."""
        return frozen_pair(self)

    # ----------------------------------------------------------------------------------------
    # The vocabulary (held by the classifier; these are the names detectron2 users call)
    def set_vocabulary(self, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None) -> None:
        """Use a new vocabulary from now on (see :meth:`ZeroShotClassifier.set_vocabulary`)."""
        self.classifier.set_vocabulary(class_names, embeddings)

    def add_vocabulary(self, key: str, class_names: Sequence[str], embeddings: Optional[torch.Tensor] = None) -> None:
        """Register a named (training) vocabulary (see :meth:`ZeroShotClassifier.add_vocabulary`)."""
        self.classifier.add_vocabulary(key, class_names, embeddings)

    @property
    def class_names(self) -> List[str]:
        return self.classifier.class_names

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    # ----------------------------------------------------------------------------------------
    # Per-image building blocks (shared by forward, the predictor and the tools)
    def rgb_images(self, images: ImageList) -> List[torch.Tensor]:
        """The batch's images as [3, h, w] uint8 RGB tensors (see :func:`regionspot.modeling.pixels.rgb_images`)."""
        return rgb_images(images, self.pixel_mean, self.pixel_std, self.input_format)

    def encode_image(self, image) -> Tuple[SamImageState, torch.Tensor]:
        """
        Args:
            image: [3, H, W] uint8 RGB tensor (any device) or [H, W, 3] uint8 RGB numpy.

        Returns:
            SAM's image state and CLIP's [1, L, D_v] feature map.
        """
        state = self.sam.encode_image(image)
        features = self.clip.dense_features(self.clip.image_to_tensor(image))
        return state, features

    def encode_images(
        self, images: Sequence, sam_states: Optional[Sequence[SamImageState]] = None
    ) -> Tuple[List[SamImageState], torch.Tensor]:
        """
        Several images through each frozen encoder in one batch.

        Args:
            images: [3, H_i, W_i] uint8 RGB tensors (or [H_i, W_i, 3] uint8 RGB numpy).
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
                if tuple(state.original_size) != image_hw(image):
                    raise ValueError(
                        f"sam_states[{i}] was encoded from a {tuple(state.original_size)} image, image {i} is "
                        f"{image_hw(image)}: the states must be those of these images, in order."
                    )
        # One image through this path gives exactly encode_image's CLIP features (the same operations).
        clip_views = [self.clip.preprocess(self.clip.image_to_tensor(im)) for im in images]
        return sam_states, self.clip.dense_features(torch.cat(clip_views), preprocessed=True)

    def region_embeddings(self, tokens: torch.Tensor, clip_features: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """[B, N, token_dim] tokens + [B, L, D_v] features -> [B, N, D_t] region embeddings."""
        return self.fusion(tokens, clip_features, padding_mask)

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
            images: the batch's pixels (uint8 RGB, or a detector's normalised float batch).
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
        rgbs = self.rgb_images(images)
        states, clip_features = self.encode_images(rgbs, sam_states) if rgbs else ([], None)
        results = [
            self.recognize(
                rgb, props, encoded=(states[i], clip_features[i : i + 1]), where=f"of image {i} of the batch"
            )
            for i, (rgb, props) in enumerate(zip(rgbs, proposals))
        ]
        return results, {}

    def forward_with_given_boxes(self, features, instances):
        """
        detectron2's given-boxes entry point passes backbone features only, and RegionSpot reads the
        image's pixels: use :meth:`classify_given_boxes` (or ``model.inference(inputs,
        detected_instances=...)`` of the ``RegionSpot`` / ``RegionSpotRelabel`` meta-architectures).
        """
        raise NotImplementedError(
            "RegionSpotROIHeads recognises regions from the image's pixels, which detectron2's "
            "forward_with_given_boxes(features, instances) does not receive (a GeneralizedRCNN's "
            "inference(detected_instances=...) goes this way). Classify known boxes with the RegionSpot or "
            "RegionSpotRelabel meta-architecture's inference(batched_inputs, detected_instances=...), with "
            "head.classify_given_boxes(images, instances), or with regionspot.RegionSpotPredictor."
        )

    def classify_given_boxes(self, images: ImageList, instances: List[Instances]) -> List[Instances]:
        """
        Classify known boxes (``pred_boxes``): one output per given box, in the given order.

        Given boxes are checked by :meth:`check_regions` before any image is encoded: NaN/inf and
        inverted boxes are refused. A box that is empty once clipped to the image (zero width or
        height, or entirely outside it) is kept, because the output has one entry per given box:
        it is scored like the others (and, as the regions attend to each other, takes part in the
        others' scores, as in the authors' model), a warning names it, and the output's
        ``empty_box`` field is True for it, so callers can drop or ignore it.

        Args:
            images: the batch's pixels (as in :meth:`forward`).
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
            for i, (rgb, props) in enumerate(zip(self.rgb_images(images), regions))
        ]

    def check_regions(
        self, regions: Instances, image_size: Tuple[int, int], where: str = "", box_field: str = "proposal_boxes"
    ) -> Optional[torch.Tensor]:
        """The prompts of one image, checked before anything is computed (see :func:`check_region_prompts`)."""
        return check_region_prompts(regions, image_size, where, box_field)

    @torch.no_grad()
    def recognize(
        self,
        image,
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
            image: [3, H, W] uint8 RGB tensor (on the model's device), or [H, W, 3] uint8 RGB numpy.
            regions: ``proposal_boxes`` and optional ``objectness_logits``, ``point_coords``,
                ``point_labels`` (N regions).
            per_region: one detection per region in the given order (no top-k, no threshold).
            encoded: the image's (SAM state, [1, L, D_v] CLIP features) when already computed.
            where: appended to field names in messages, e.g. "of image 2 of the batch".
            box_field: how the boxes are called in messages.

        Returns:
            Instances of size (H, W) with ``pred_boxes``, ``scores`` (see :meth:`ZeroShotClassifier.class_scores`),
            ``pred_classes``, ``mask_scores``, with ``per_region`` also ``empty_box`` [N] bool, and,
            if ``mask_on``, ``pred_masks`` as :class:`SamMasks` (call ``to_bitmasks(None, H, W)``;
            detectron2's ``detector_postprocess`` does).

        Raises:
            ValueError: a refused prompt (see :meth:`check_regions`).
        """
        image = as_rgb_tensor(image, self.pixel_mean.device)
        image_size = image_hw(image)
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
        logits = self.classifier(self.region_embeddings(sam_out.tokens[None], clip_features)[0])
        probs = self.classifier.class_scores(logits)
        box_scores = None
        if self.use_box_scores and regions.has("objectness_logits"):
            box_scores = regions.objectness_logits.to(probs).sigmoid()
        elif self.object_score_as_box_score and getattr(sam_out, "object_scores", None) is not None:
            box_scores = sam_out.object_scores.to(probs).sigmoid()
        if per_region:
            scores, classes = probs.max(dim=1) if len(probs) else (probs.new_zeros(0), probs.new_zeros(0, dtype=torch.long))
            region_idx = torch.arange(len(probs), device=probs.device)
        else:
            valid = None
            if boxes is not None:  # detections whose box is empty once clipped to the image are dropped
                clipped = Boxes(boxes.to(probs.device).clone())
                clipped.clip(image_size)
                valid = clipped.nonempty()
            region_idx, classes, scores = self.selector(probs, box_scores, valid)
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
            # What up-samples the localizer's logits: its mask_postprocessor, or the stock SAM itself.
            out.pred_masks = SamMasks(
                low_res, index, getattr(self.sam, "mask_postprocessor", None) or self.sam.sam, state.input_size, source_size=image_size, resize=self.mask_resize
            )
            if boxes_from_masks:
                out.pred_boxes = out.pred_masks.to_bitmasks(None, *image_size).get_bounding_boxes()
        return out

    # ----------------------------------------------------------------------------------------
    def losses(
        self, images: ImageList, targets: List[Instances], vocabulary: Optional[str] = None
    ) -> Dict[str, torch.Tensor]:
        """
        The training loss of GT regions as prompts (:func:`region_focal_loss` over the current
        vocabulary, or the named one of the batch's dataset).

        Returns:
            ``{"loss_region_cls": scalar}``.
        """
        _check_batch_length(images, targets, "targets")
        for i, (size, t) in enumerate(zip(images.image_sizes, targets)):
            # NaN boxes would make the loss NaN after hours of training; refuse them at once.
            check_boxes(t.gt_boxes.tensor, tuple(size), f"gt_boxes of image {i} of the batch")
        states, clip_features = self.encode_images(self.rgb_images(images))
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
        device = clip_features.device
        padded = torch.zeros(batch, max(n_max, 1), self.sam.token_dim, device=device)
        padding = torch.ones(batch, max(n_max, 1), dtype=torch.bool, device=device)
        for i, t in enumerate(tokens):
            padded[i, : len(t)] = t.to(device=device, dtype=padded.dtype)
            padding[i, : len(t)] = False
        # An image without regions still runs one (ignored) query so attention stays defined.
        padding[:, 0] &= torch.tensor([c > 0 for c in counts], device=device)
        logits = self.classifier(self.region_embeddings(padded, clip_features.float(), padding), vocabulary)
        return region_focal_loss(logits, labels, self.focal_alpha, self.focal_gamma)
