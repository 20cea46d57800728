"""
Localizers other than the released SAM, each from its maintained package, used unchanged:

* :class:`Sam2RegionTokens`: SAM 2.1 (Meta's ``sam2``) through its own ``SAM2ImagePredictor``
  preprocessing and backbone features; the region token is the ``sam_tokens_out`` its mask decoder
  returns (mask token 0, the single-mask token), and its object-score logit is offered as a box score.
* :class:`HQSamRegionTokens`: HQ-SAM (``segment_anything_hq``), including the light HQ-SAM
  (``vit_tiny``: MobileSAM's TinyViT encoder). The token is mask token 0 out of the two-way
  transformer, read with the same forward hook as :class:`SamRegionTokens`.

The fast forwards of :mod:`regionspot.modeling.sam_fast` are written for ``segment_anything``'s
modules and are not applied here: both run their packages' stock forwards.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
import torch
from torch import nn

from .frozen import FrozenModule, seeded
from .model_registry import LOCALIZER_REGISTRY, LocalizerOutput
from .sam_tokens import SamImageState, SamRegionTokens
from .weights import WeightsFileError, read_weights_file, unwrap_state_dict

logger = logging.getLogger(__name__)

__all__ = ["Sam2RegionTokens", "HQSamRegionTokens", "build_sam2_model", "build_hq_sam", "SAM2_TYPES", "HQ_SAM_TYPES"]


def _as_numpy_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    return np.ascontiguousarray(image)


def _check_type(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is unknown; use one of {', '.join(allowed)}.")


def _random_or_file(key: str, weights: str, random_init: bool, what: str) -> None:
    if not weights and not random_init:
        raise ValueError(
            f"{key} is empty: point it at {what}, or set MODEL.REGIONSPOT.FROZEN.RANDOM_INIT=True for random stand-in "
            "weights (tests only)."
        )
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"{key}={weights!r} does not exist. Give the path of {what}.")


# ------------------------------------------------------------------------------------------------
# SAM 2.1
SAM2_TYPES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", "tiny")
# A small SAM 2.1 (256 px input, 16x16 embedding, width-32 decoder) from the package's hiera_t config.
_TINY_SAM2_OVERRIDES = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
]


def _load_weights(model, weights: str, key: str, what: str) -> None:
    """Load the checkpoint ``weights`` (config key ``key``) into ``model``, refusing one that does not fit ``what``."""
    state = unwrap_state_dict(read_weights_file(weights, key, f"the checkpoint of {what}"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsFileError(
            f"{key}={weights!r} does not fit {what}: {str(e).splitlines()[0][:300]}", weights, key,
        ) from e

def build_sam2_model(sam2_type: str, weights: str = "", random_init: bool = False, seed: int = 0):
    """
    ``sam2.build_sam.build_sam2`` of the package's own ``configs/sam2.1/<type>.yaml`` (eval, CPU):
    seeded random weights, or the official checkpoint ``weights`` (``sam2.1_hiera_tiny.pt``, ...)
    read by the package's loader.
    """
    _check_type("MODEL.REGIONSPOT.LOCALIZER.TYPE", sam2_type, SAM2_TYPES)
    key = "MODEL.REGIONSPOT.LOCALIZER.WEIGHTS"
    _random_or_file(key, weights, random_init, f"the official SAM 2.1 checkpoint of LOCALIZER.TYPE={sam2_type!r}")
    from sam2.build_sam import build_sam2

    config = "configs/sam2.1/" + ("sam2.1_hiera_t" if sam2_type == "tiny" else sam2_type) + ".yaml"
    overrides = _TINY_SAM2_OVERRIDES if sam2_type == "tiny" else []
    with seeded(seed):
        model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=list(overrides))
    if weights:
        _load_weights(model, weights, key, f"the SAM 2.1 model LOCALIZER.TYPE={sam2_type!r}")
    return model.float().eval()


@dataclass
class Sam2ImageState(SamImageState):
    """SAM 2's features of one image: the image embedding and its two high-resolution levels."""

    high_res: List[torch.Tensor] = field(default_factory=list)


class _Sam2Masks:
    """What :class:`SamMasks` calls: SAM 2's own mask post-processing (straight to the output size)."""

    mask_threshold = 0.0

    def __init__(self, transforms):
        self.transforms = transforms

    def postprocess_masks(self, low_res, input_size, output_size):
        del input_size  # SAM 2 up-samples its square-frame logits straight to the image's size
        return self.transforms.postprocess_masks(low_res, tuple(output_size))


@LOCALIZER_REGISTRY.register()
class Sam2RegionTokens(FrozenModule):
    """
    Frozen SAM 2.1 turning region prompts into tokens, masks, IoU and object scores.

    Images go through ``SAM2ImagePredictor.set_image_batch`` (its resize of the whole image to the
    square input, normalisation, backbone features with the no-memory embedding); prompts are mapped
    with the predictor's ``transform_boxes`` / ``transform_coords`` and decoded as its ``_predict`` does.
    """

    def __init__(self, model):
        super().__init__()
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.sam = model
        # Not a module: held outside the module tree so the weights are not registered twice.
        predictor = SAM2ImagePredictor(model)
        s = int(model.image_size)
        predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        object.__setattr__(self, "_predictor", predictor)
        self.mask_postprocessor = _Sam2Masks(predictor._transforms)
        self.freeze()

    @classmethod
    def from_regionspot_config(cls, cfg) -> "Sam2RegionTokens":
        rs = cfg.MODEL.REGIONSPOT
        sam2_type = rs.LOCALIZER.TYPE or "sam2.1_hiera_b+"
        adapter = cls(build_sam2_model(sam2_type, rs.LOCALIZER.WEIGHTS, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED))
        adapter.model_name = sam2_type
        return adapter

    @property
    def token_dim(self) -> int:
        return int(self.sam.sam_mask_decoder.transformer_dim)

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    @torch.no_grad()
    def encode_image(self, image) -> Sam2ImageState:
        return self.encode_images([image])[0]

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> List[Sam2ImageState]:
        predictor = self._predictor
        arrays = [_as_numpy_hwc(im) for im in images]
        with self.autocast():
            predictor.set_image_batch(arrays)
        feats = predictor._features
        s = int(self.sam.image_size)
        states = [
            Sam2ImageState(
                embedding=feats["image_embed"][i : i + 1].float(),
                input_size=(s, s),
                original_size=tuple(int(v) for v in a.shape[:2]),
                high_res=[f[i : i + 1].float() for f in feats["high_res_feats"]],
            )
            for i, a in enumerate(arrays)
        ]
        predictor.reset_predictor()
        return states

    @torch.no_grad()
    def decode_prompts(
        self, state: Sam2ImageState, boxes=None, points=None, point_labels=None, with_masks: bool = True, chunk_size: int = 32
    ) -> LocalizerOutput:
        transforms = self._predictor._transforms
        device = self.device
        n = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        if n == 0:
            g = state.embedding.shape[-1] * 4
            empty = state.embedding.new_zeros((0,))
            return LocalizerOutput(
                state.embedding.new_zeros((0, self.token_dim)),
                state.embedding.new_zeros((0, 1, g, g)) if with_masks else None, empty, empty.clone(),
            )
        box = pts = labels = None
        if boxes is not None:
            box = torch.as_tensor(boxes).to(device=device, dtype=torch.float)
            box = transforms.transform_boxes(box, normalize=True, orig_hw=state.original_size)
        if points is not None:
            pts = torch.as_tensor(points).to(device=device, dtype=torch.float)
            pts = transforms.transform_coords(pts, normalize=True, orig_hw=state.original_size)
            labels = torch.as_tensor(point_labels).to(device=device, dtype=torch.int)
        tokens, masks, scores, objects = [], [], [], []
        image_pe = self.sam.sam_prompt_encoder.get_dense_pe()
        with self.autocast():
            for start in range(0, n, max(chunk_size, 1)):
                sl = slice(start, start + chunk_size)
                concat = None if pts is None else (pts[sl], labels[sl])
                if box is not None:  # SAM2ImagePredictor._predict: a box is two corner points, labels 2 and 3
                    b = box[sl].reshape(-1, 2, 2)
                    b_labels = torch.tensor([[2, 3]], dtype=torch.int, device=device).repeat(b.shape[0], 1)
                    concat = (b, b_labels) if concat is None else (
                        torch.cat([b, concat[0]], dim=1), torch.cat([b_labels, concat[1]], dim=1)
                    )
                sparse, dense = self.sam.sam_prompt_encoder(points=concat, boxes=None, masks=None)
                low_res, iou, sam_tokens, object_logits = self.sam.sam_mask_decoder(
                    image_embeddings=state.embedding,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                    repeat_image=concat[0].shape[0] > 1,
                    high_res_features=state.high_res,
                )
                tokens.append(sam_tokens[:, 0])
                if with_masks:
                    masks.append(torch.clamp(low_res, -32.0, 32.0))
                scores.append(iou[:, 0])
                objects.append(object_logits[:, 0])
        return LocalizerOutput(
            tokens=torch.cat(tokens).float(),
            low_res_masks=torch.cat(masks).float() if with_masks else None,
            mask_scores=torch.cat(scores).float(),
            object_scores=torch.cat(objects).float(),
        )

    @torch.no_grad()
    def postprocess_masks(self, low_res_masks, state, output_size=None) -> torch.Tensor:
        """[N, 1, h, w] logits -> [N, H, W] bool masks (SAM 2's post-processing and threshold)."""
        output_size = tuple(output_size or state.original_size)
        if low_res_masks.shape[0] == 0:
            return torch.zeros((0, *output_size), dtype=torch.bool, device=low_res_masks.device)
        up = self.mask_postprocessor.postprocess_masks(low_res_masks, state.input_size, output_size)
        return up[:, 0] > self.mask_postprocessor.mask_threshold


# ------------------------------------------------------------------------------------------------
# HQ-SAM
HQ_SAM_TYPES = ("vit_b", "vit_l", "vit_h", "vit_tiny", "tiny")


def _build_tiny_hq_sam():
    """A small HQ-SAM of the package's classes (256 px input, 16x16 embedding, width-32 decoder)."""
    from functools import partial

    from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

    image_size, patch, dim = 256, 16, 32
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=image_size, mlp_ratio=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=patch, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=4,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(image_size // patch,) * 2, input_image_size=(image_size,) * 2,
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoderHQ(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim, vit_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def build_hq_sam(hq_type: str, weights: str = "", random_init: bool = False, seed: int = 0):
    """
    A ``segment_anything_hq`` Sam (``sam_model_registry[type]()``, or the tiny preset) in eval mode on
    the CPU: seeded random weights, or the official file ``weights`` (``sam_hq_vit_b.pth``, ...) read
    with ``torch.load(weights_only=True)`` and loaded strictly.
    """
    _check_type("MODEL.REGIONSPOT.LOCALIZER.TYPE", hq_type, HQ_SAM_TYPES)
    key = "MODEL.REGIONSPOT.LOCALIZER.WEIGHTS"
    _random_or_file(key, weights, random_init, f"the official HQ-SAM checkpoint of LOCALIZER.TYPE={hq_type!r}")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overwriting tiny_vit.*")  # its TinyViT vs timm's registry
        from segment_anything_hq import sam_model_registry

    with seeded(seed):
        model = _build_tiny_hq_sam() if hq_type == "tiny" else sam_model_registry[hq_type]()
    if weights:
        _load_weights(model, weights, key, f"the HQ-SAM model LOCALIZER.TYPE={hq_type!r}")
    return model.float().eval()


@dataclass
class HQSamImageState(SamImageState):
    """HQ-SAM's image state: SAM's, plus the encoder's intermediate embeddings its HQ decoder reads."""

    interm_embeddings: List[torch.Tensor] = field(default_factory=list)


@LOCALIZER_REGISTRY.register()
class HQSamRegionTokens(SamRegionTokens):
    """
    Frozen HQ-SAM: :class:`SamRegionTokens`'s preprocessing and prompt mapping (``SamPredictor``'s;
    HQ-SAM keeps SAM's), the HQ image encoder (embedding + intermediate embeddings) and the HQ mask
    decoder (``hq_token_only`` False: SAM's mask plus the HQ mask, as HQ-SAM's predictor by default).
    """

    def __init__(self, sam, hq_token_only: bool = False):
        super().__init__(sam, fast=False)
        self.hq_token_only = bool(hq_token_only)
        self.mask_postprocessor = sam

    @classmethod
    def from_regionspot_config(cls, cfg) -> "HQSamRegionTokens":
        rs = cfg.MODEL.REGIONSPOT
        hq_type = rs.LOCALIZER.TYPE or "vit_b"
        adapter = cls(build_hq_sam(hq_type, rs.LOCALIZER.WEIGHTS, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED))
        adapter.model_name = hq_type
        return adapter

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> List[HQSamImageState]:
        batch, sizes = self.encoder_input(images)
        with self.autocast():
            embeddings, interm = self.sam.image_encoder(batch)
        return [
            HQSamImageState(
                embedding=embeddings[i : i + 1].float(), input_size=input_size, original_size=original_size,
                interm_embeddings=[t[i : i + 1].float() for t in interm],
            )
            for i, (original_size, input_size) in enumerate(sizes)
        ]

    @torch.no_grad()
    def decode_prompts(
        self, state: HQSamImageState, boxes=None, points=None, point_labels=None, with_masks: bool = True, chunk_size: int = 32
    ) -> LocalizerOutput:
        n = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        sam_boxes, sam_points = self._prompts_to_sam_frame(state, boxes, points, point_labels)
        if n == 0:
            g = state.embedding.shape[-1] * 4
            empty = state.embedding.new_zeros((0,))
            return LocalizerOutput(
                state.embedding.new_zeros((0, self.token_dim)),
                state.embedding.new_zeros((0, 1, g, g)) if with_masks else None, empty,
            )
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        tokens, masks, scores = [], [], []
        with self.autocast():
            for start in range(0, n, max(chunk_size, 1)):
                sl = slice(start, start + chunk_size)
                pts = None if sam_points is None else (sam_points[0][sl], sam_points[1][sl])
                bxs = None if sam_boxes is None else sam_boxes[sl]
                sparse, dense = self.sam.prompt_encoder(points=pts, boxes=bxs, masks=None)
                low_res, iou = self.sam.mask_decoder(
                    image_embeddings=state.embedding,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                    hq_token_only=self.hq_token_only,
                    interm_embeddings=state.interm_embeddings,
                )
                tokens.append(self._captured)
                self._captured = None
                if with_masks:
                    masks.append(low_res)
                scores.append(iou[:, 0])
        return LocalizerOutput(
            tokens=torch.cat(tokens).float(),
            low_res_masks=torch.cat(masks).float() if with_masks else None,
            mask_scores=torch.cat(scores).float(),
        )
