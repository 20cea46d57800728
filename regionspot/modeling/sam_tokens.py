"""
SAM branch of RegionSpot: position-aware region tokens (and masks) from the stock
``segment_anything`` package.

The token of a region prompt is the output of SAM's two-way transformer for mask token 0 (the
single-mask token), after its final token-to-image attention and norm and before the hypernetwork
MLP. ``segment_anything`` computes it inside ``MaskDecoder.predict_masks`` without returning it; a
forward hook on ``mask_decoder.transformer`` (whose output is ``(hs, src)``) reads it, so SAM's code
is used unchanged.
"""
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from .weights import WeightsFileError, read_weights_file, unwrap_state_dict, wrong_weights_error
from .frozen import FrozenModule, seeded
from .sam_fast import decode_prompts_fast, use_fused_encoder_attention
from .pixels import image_hw

logger = logging.getLogger(__name__)

__all__ = ["SamRegionTokens", "SamImageState", "SamPromptOutput", "build_sam", "SAM_TYPES"]

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")


def _build_tiny_sam() -> Sam:
    """A small SAM made of the stock classes (256 px input, 16x16 embedding, width-32 decoder)."""
    image_size, patch, dim = 256, 16, 32
    grid = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=image_size,
            mlp_ratio=2,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=4,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


# The official file of each SAM.TYPE, named in the messages.
_SAM_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "tiny": "a torch.save of build_sam('tiny', ...).state_dict()",
}
# A SAM state dict has these three modules (segment_anything.Sam's children).
_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _read_sam_state_dict(weights: str, sam_type: str):
    """
    SAM's state dict from ``weights`` (``torch.load(weights_only=True)``; a ``{"model": ...}``
    wrapper is accepted), refused with a clear message when the file is unusable or another model's.
    """
    key = "MODEL.REGIONSPOT.SAM.WEIGHTS"
    expected = f"SAM's official state dict for SAM.TYPE={sam_type!r} ({_SAM_FILES[sam_type]})"
    state_dict = unwrap_state_dict(read_weights_file(weights, key, expected))
    if not isinstance(state_dict, dict):
        raise WeightsFileError(
            f"{key}={weights!r} holds a {type(state_dict).__name__}, not a state dict. {key} must be {expected}.",
            weights, key,
        )
    if not any(k.startswith(_SAM_PREFIXES) for k in state_dict if isinstance(k, str)):
        raise wrong_weights_error(
            weights, key, expected, "holds no SAM weights (no image_encoder.*, prompt_encoder.*, mask_decoder.* keys)",
            state_dict,
        )
    return state_dict


def build_sam(sam_type: str, weights: str = "", random_init: bool = False, seed: int = 0) -> Sam:
    """
    Build a stock ``segment_anything.Sam``.

    Args:
        sam_type: one of ``SAM_TYPES``.
        weights: path to an official SAM state dict (``sam_vit_b_01ec64.pth``, ...), read with
            ``torch.load(weights_only=True)``.
        random_init: allow empty ``weights``; the model then has seeded random weights.
        seed: seed of the random weights.

    Returns:
        Sam in eval mode, fp32, on CPU.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: unknown type, or empty ``weights`` without ``random_init``.
        regionspot.checkpoint.WeightsFileError: (a ValueError) ``weights`` is unreadable (empty,
            cut short, not a checkpoint), another model's (CLIP, RegionSpot, a detector), or SAM
            weights of another ``sam_type``.
    """
    if sam_type not in SAM_TYPES:
        raise ValueError(
            f"MODEL.REGIONSPOT.SAM.TYPE={sam_type!r} is unknown; use one of {', '.join(SAM_TYPES)}."
        )
    if not weights and not random_init:
        raise ValueError(
            "MODEL.REGIONSPOT.SAM.WEIGHTS is empty: point it at SAM's official weights "
            f"(e.g. sam_vit_b_01ec64.pth for SAM.TYPE={sam_type!r}), or set "
            "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT=True for random stand-in weights (tests only)."
        )
    if weights and not os.path.isfile(weights):
        # Before building: a ViT-H takes seconds to initialise.
        raise FileNotFoundError(
            f"MODEL.REGIONSPOT.SAM.WEIGHTS={weights!r} does not exist. Download the official checkpoint of "
            f"SAM.TYPE={sam_type!r} ({_SAM_FILES[sam_type]}) and give its path."
        )
    state_dict = _read_sam_state_dict(weights, sam_type) if weights else None
    with seeded(seed):
        sam = _build_tiny_sam() if sam_type == "tiny" else sam_model_registry[sam_type]()
    if state_dict is not None:
        try:
            sam.load_state_dict(state_dict)
        except RuntimeError as e:
            raise WeightsFileError(
                f"SAM weights {weights!r} (MODEL.REGIONSPOT.SAM.WEIGHTS) do not fit "
                f"MODEL.REGIONSPOT.SAM.TYPE={sam_type!r}; choose the TYPE the file was made for (or the file of "
                f"that TYPE: {_SAM_FILES[sam_type]}). Details: {str(e).splitlines()[0]}",
                weights, "MODEL.REGIONSPOT.SAM.WEIGHTS",
            ) from e
    return sam.eval()


@dataclass
class SamImageState:
    """What SAM keeps of one image between its encoder and its prompt decoder."""

    embedding: torch.Tensor  # [1, C, g, g] image embedding
    input_size: Tuple[int, int]  # (h, w) of the resized image inside SAM's square input
    original_size: Tuple[int, int]  # (H, W) of the image the prompts refer to


@dataclass
class SamPromptOutput:
    """SAM's outputs for N region prompts of one image."""

    tokens: torch.Tensor  # [N, C] position-aware region tokens
    low_res_masks: Optional[torch.Tensor]  # [N, 1, 4g, 4g] mask logits, or None
    mask_scores: torch.Tensor  # [N] SAM's predicted IoU


class SamRegionTokens(FrozenModule):
    """
    Frozen SAM turning region prompts into position-aware tokens and masks.

    Preprocessing is the stock ``SamPredictor``'s: longest side resized to the encoder's input
    size (``ResizeLongestSide`` on the uint8 image, :meth:`resize_image`), SAM's pixel normalisation
    and padding; box and point prompts are mapped into that frame as ``ResizeLongestSide.apply_boxes``
    does (float64), as tensors on the device.
    """

    def __init__(self, sam: Sam, fast: bool = True):
        """
        Args:
            sam: a stock ``segment_anything.Sam``.
            fast: use the fused encoder attention and the shared-image prompt decoding of
                :mod:`regionspot.modeling.sam_fast` (same outputs to ~1e-5); False runs the stock
                forwards (the reference path).
        """
        super().__init__()
        self.sam = sam
        self.fast = fast
        if fast:
            use_fused_encoder_attention(sam)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        # Run from bf16 copies under FROZEN.PRECISION bf16 (see FrozenModule); the prompt encoder's
        # Fourier features of the coordinates stay fp32.
        self.bf16_parts = ("sam.image_encoder", "sam.mask_decoder")
        self._captured = None
        sam.mask_decoder.transformer.register_forward_hook(self._capture_tokens)
        self.freeze()

    @property
    def token_dim(self) -> int:
        """Width of a region token (256 for the released SAMs)."""
        return self.sam.mask_decoder.transformer_dim

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def _capture_tokens(self, module, inputs, outputs):
        hs = outputs[0]
        # hs[:, 0] is the IoU token, hs[:, 1] mask token 0 (the single-mask output).
        self._captured = hs[:, 1, :]

    @torch.no_grad()
    def encode_image(self, image) -> SamImageState:
        """
        Args:
            image: [3, H, W] uint8 RGB tensor (any device) or [H, W, 3] uint8 RGB numpy.

        Returns:
            SamImageState with the [1, C, g, g] embedding.
        """
        return self.encode_images([image])[0]

    def resize_image(self, image) -> torch.Tensor:
        """
        SAM's view of one image: ``ResizeLongestSide.apply_image`` (a PIL resize of the uint8 image,
        as the stock ``SamPredictor.set_image``; a torch resize would differ), as a [3, h, w] uint8
        tensor on this module's device. This is the one step of the pixel path that runs on the CPU.

        Args:
            image: [3, H, W] uint8 RGB tensor (any device) or [H, W, 3] uint8 RGB numpy.
        """
        if isinstance(image, torch.Tensor):
            image = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
        resized = self.transform.apply_image(image)
        return torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> List[SamImageState]:
        """
        Run the image encoder once on a batch of images (each resized, normalised and padded to
        SAM's square input as the stock ``SamPredictor`` does, see :meth:`resize_image`).

        Args:
            images: [3, H_i, W_i] uint8 RGB tensors (any device) or [H_i, W_i, 3] uint8 RGB numpy.

        Returns:
            one SamImageState per image.
        """
        batch, sizes = self.encoder_input(images)
        encoder = self.part("sam.image_encoder")
        with self.autocast():
            embeddings = encoder(batch.to(encoder.patch_embed.proj.weight.dtype)).float()
        return [
            SamImageState(embedding=embeddings[i : i + 1], input_size=input_size, original_size=original_size)
            for i, (original_size, input_size) in enumerate(sizes)
        ]

    def encoder_input(self, images: Sequence) -> Tuple[torch.Tensor, List[Tuple[Tuple[int, int], Tuple[int, int]]]]:
        """
        SAM's input batch for ``images`` (each resized by :meth:`resize_image`, normalised and padded by
        ``Sam.preprocess``) and, per image, ((H, W) of the image, (h, w) of its resized view).
        """
        batch, sizes = [], []
        for image in images:
            x = self.resize_image(image)
            sizes.append((image_hw(image), tuple(x.shape[-2:])))
            batch.append(self.sam.preprocess(x[None].float()))
        return torch.cat(batch), sizes

    def _to_sam_frame(self, coords: torch.Tensor, original_size: Tuple[int, int]) -> torch.Tensor:
        """
        [..., 2] XY pixels of the original image -> SAM's input frame, as
        ``ResizeLongestSide.apply_coords`` computes it (float64, then float32), on the device.
        """
        old_h, old_w = original_size
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(old_h, old_w, self.transform.target_length)
        c = coords.to(device=self.device, dtype=torch.float64).clone()
        c[..., 0] = c[..., 0] * (new_w / old_w)
        c[..., 1] = c[..., 1] * (new_h / old_h)
        return c.to(torch.float32)

    def _prompts_to_sam_frame(self, state: SamImageState, boxes, points, point_labels):
        sam_boxes = sam_points = None
        if boxes is not None:
            b = torch.as_tensor(boxes).reshape(-1, 2, 2)
            sam_boxes = self._to_sam_frame(b, state.original_size).reshape(-1, 4)
        if points is not None:
            sam_points = (
                self._to_sam_frame(torch.as_tensor(points), state.original_size),
                torch.as_tensor(point_labels).to(device=self.device, dtype=torch.int64),
            )
        return sam_boxes, sam_points

    @torch.no_grad()
    def decode_prompts(
        self,
        state: SamImageState,
        boxes=None,
        points=None,
        point_labels=None,
        with_masks: bool = True,
        chunk_size: int = 32,
    ) -> SamPromptOutput:
        """
        Run SAM's prompt encoder and mask decoder (single-mask mode) for N region prompts.

        Args:
            state: from :meth:`encode_image`.
            boxes: [N, 4] XYXY boxes in pixels of the encoded image (a tensor, on any device, or an
                array), or None; mapped into SAM's frame in float64 on the device, as the stock
                ``SamPredictor`` does in numpy.
            points: [N, P, 2] XY point prompts in pixels, or None; with ``point_labels`` [N, P]
                (1 foreground, 0 background). Boxes and points may be given together.
            with_masks: keep the [N, 1, 4g, 4g] low-resolution mask logits.
            chunk_size: prompts decoded at once.

        Returns:
            SamPromptOutput.
        """
        n = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        sam_boxes, sam_points = self._prompts_to_sam_frame(state, boxes, points, point_labels)
        dim = self.token_dim
        if n == 0:
            g = state.embedding.shape[-1] * 4
            empty_masks = state.embedding.new_zeros((0, 1, g, g)) if with_masks else None
            return SamPromptOutput(state.embedding.new_zeros((0, dim)), empty_masks, state.embedding.new_zeros((0,)))

        with self.autocast():
            out = self._decode_chunks(state, n, sam_boxes, sam_points, with_masks, chunk_size)
        tokens, masks, scores = out
        return SamPromptOutput(
            tokens=torch.cat(tokens).float(),
            low_res_masks=torch.cat(masks).float() if with_masks else None,
            mask_scores=torch.cat(scores).float(),
        )

    def _decode_chunks(self, state, n, sam_boxes, sam_points, with_masks, chunk_size):
        decoder = self.part("sam.mask_decoder")
        dtype = decoder.iou_token.weight.dtype
        image_pe = self.sam.prompt_encoder.get_dense_pe().to(dtype)
        embedding = state.embedding.to(dtype)
        tokens, masks, scores = [], [], []
        for start in range(0, n, max(chunk_size, 1)):
            sl = slice(start, start + chunk_size)
            pts = None if sam_points is None else (sam_points[0][sl], sam_points[1][sl])
            bxs = None if sam_boxes is None else sam_boxes[sl]
            sparse, dense = self.sam.prompt_encoder(points=pts, boxes=bxs, masks=None)
            if self.fast:
                token, low_res, iou = decode_prompts_fast(
                    self.sam, embedding, sparse, dense, with_masks, mask_decoder=decoder, image_pe=image_pe
                )
                tokens.append(token)
                if with_masks:
                    masks.append(low_res)
                scores.append(iou)
                continue
            low_res, iou = decoder(
                image_embeddings=embedding,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
                multimask_output=False,
            )
            tokens.append(self._captured)
            self._captured = None
            if with_masks:
                masks.append(low_res)
            scores.append(iou[:, 0])
        return tokens, masks, scores

    @torch.no_grad()
    def postprocess_masks(self, low_res_masks: torch.Tensor, state: SamImageState, output_size=None) -> torch.Tensor:
        """
        Up-sample mask logits the stock SAM way, then threshold.

        Args:
            low_res_masks: [N, 1, 4g, 4g] logits from :meth:`decode_prompts`.
            state: the image's state.
            output_size: (H, W) of the returned masks; default the encoded image's size.

        Returns:
            [N, H, W] bool masks.
        """
        output_size = tuple(output_size or state.original_size)
        if low_res_masks.shape[0] == 0:
            return torch.zeros((0, *output_size), dtype=torch.bool, device=low_res_masks.device)
        up = self.sam.postprocess_masks(low_res_masks, state.input_size, output_size)
        return up[:, 0] > self.sam.mask_threshold
