"""
CLIP branch of RegionSpot: the dense feature map of the whole image and the text tower, from the
stock ``clip`` package (``clip-anytorch`` provides ``import clip``).
"""
import logging
import os
from typing import Dict, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from clip.model import CLIP
from clip.model import LayerNorm as ClipLayerNorm
from clip.model import build_model as build_clip_model

from .weights import WeightsFileError, read_weights_file, unwrap_state_dict, wrong_weights_error
from .frozen import FrozenModule, seeded

logger = logging.getLogger(__name__)

__all__ = ["ClipDenseFeatures", "build_clip", "CLIP_ARCHS", "CLIP_PIXEL_MEAN", "CLIP_PIXEL_STD"]

CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

# Constructor arguments of clip.model.CLIP for each supported type (OpenAI's published shapes).
CLIP_ARCHS: Dict[str, dict] = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, transformer_width=768, transformer_heads=12, transformer_layers=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, transformer_width=768, transformer_heads=12, transformer_layers=12),
    # A small CLIP of the same classes for tests and the built-in quickstart (4x4 patch grid).
    "tiny": dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64,
                 vision_patch_size=16, transformer_width=64, transformer_heads=1, transformer_layers=2),
}
_CONTEXT_LENGTH, _VOCAB_SIZE = 77, 49408


def _arch_of(model: CLIP) -> Tuple[int, int, int]:
    v = model.visual
    return v.input_resolution, v.conv1.kernel_size[0], v.conv1.out_channels


# OpenAI's file of each CLIP.TYPE, named in the messages.
_CLIP_FILES = {
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-L/14@336px": "ViT-L-14-336px.pt",
    "tiny": "a torch.save of build_clip('tiny', ...).state_dict()",
}
# Keys clip.model.build_model reads to size the model: without them it fails with a bare KeyError.
_CLIP_REQUIRED = ("visual.conv1.weight", "positional_embedding", "text_projection", "token_embedding.weight",
                  "ln_final.weight")


def _read_clip_state_dict(weights: str, clip_type: str) -> Dict[str, torch.Tensor]:
    """
    CLIP's state dict from ``weights``: an OpenAI TorchScript archive (``torch.jit.load``, which runs
    no Python) or a plain state dict (``torch.load(weights_only=True)``; a ``{"model": ...}`` or
    ``{"state_dict": ...}`` wrapper is accepted). Refused with a clear message when the file is
    unusable or another model's.
    """
    key = "MODEL.REGIONSPOT.CLIP.WEIGHTS"
    expected = (
        f"OpenAI's CLIP file for CLIP.TYPE={clip_type!r} ({_CLIP_FILES[clip_type]}; TorchScript) or a plain CLIP "
        "state dict"
    )
    state_dict = unwrap_state_dict(read_weights_file(weights, key, expected, allow_torchscript=True))
    if not isinstance(state_dict, dict):
        raise WeightsFileError(
            f"{key}={weights!r} holds a {type(state_dict).__name__}, not a state dict. {key} must be {expected}.",
            weights, key,
        )
    missing = [k for k in _CLIP_REQUIRED if k not in state_dict]
    if missing:
        clip_like = any(isinstance(k, str) and k.startswith(("visual.", "transformer.resblocks.")) for k in state_dict)
        problem = (
            f"is an incomplete CLIP state dict (no {', '.join(missing)})" if clip_like
            else "holds no OpenAI CLIP weights (no visual.*, transformer.resblocks.*, token_embedding.* keys)"
        )
        raise wrong_weights_error(weights, key, expected, problem, state_dict)
    return state_dict


def build_clip(clip_type: str, weights: str = "", random_init: bool = False, seed: int = 0) -> CLIP:
    """
    Build a stock ``clip.model.CLIP`` in fp32.

    Args:
        clip_type: a key of ``CLIP_ARCHS``.
        weights: OpenAI archive (``ViT-B-16.pt``, TorchScript) or a plain state dict. Read as
            ``clip.load(path, device="cpu", jit=False)`` reads them (``clip.model.build_model`` on the
            archive's or file's state dict), with ``torch.load(weights_only=True)`` for state dicts.
        random_init: allow empty ``weights``; the model then has seeded random weights.
        seed: seed of the random weights.

    Returns:
        CLIP in eval mode, fp32, on CPU.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: unknown type, or empty ``weights`` without ``random_init``.
        regionspot.checkpoint.WeightsFileError: (a ValueError) ``weights`` is unreadable (empty,
            cut short, not a checkpoint), another model's (SAM, RegionSpot, a detector), or a CLIP of
            another ``clip_type``.
    """
    if clip_type not in CLIP_ARCHS:
        raise ValueError(
            f"MODEL.REGIONSPOT.CLIP.TYPE={clip_type!r} is unknown; use one of {', '.join(CLIP_ARCHS)}."
        )
    if not weights:
        if not random_init:
            raise ValueError(
                "MODEL.REGIONSPOT.CLIP.WEIGHTS is empty: point it at OpenAI's CLIP archive for "
                f"CLIP.TYPE={clip_type!r} (e.g. ViT-B-16.pt), or set "
                "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT=True for random stand-in weights (tests only)."
            )
        with seeded(seed):
            model = CLIP(context_length=_CONTEXT_LENGTH, vocab_size=_VOCAB_SIZE, **CLIP_ARCHS[clip_type])
        return model.float().eval()
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.REGIONSPOT.CLIP.WEIGHTS={weights!r} does not exist. Give the path of OpenAI's archive for "
            f"CLIP.TYPE={clip_type!r} ({_CLIP_FILES[clip_type]})."
        )
    state_dict = _read_clip_state_dict(weights, clip_type)
    try:
        # What clip.load(jit=False) does with the state dict (fp16 weights, as OpenAI's archives).
        model = build_clip_model(state_dict)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        raise WeightsFileError(
            f"MODEL.REGIONSPOT.CLIP.WEIGHTS={weights!r} does not hold a complete OpenAI CLIP model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). It must be OpenAI's CLIP "
            f"file for CLIP.TYPE={clip_type!r} ({_CLIP_FILES[clip_type]}) or a plain CLIP state dict.",
            weights, "MODEL.REGIONSPOT.CLIP.WEIGHTS",
        ) from e
    model = model.float().eval()
    arch = CLIP_ARCHS[clip_type]
    expected = (arch["image_resolution"], arch["vision_patch_size"], arch["vision_width"])
    if _arch_of(model) != expected:
        raise WeightsFileError(
            f"CLIP weights {weights!r} (MODEL.REGIONSPOT.CLIP.WEIGHTS) are a ViT with (resolution, patch, width) = "
            f"{_arch_of(model)}, but MODEL.REGIONSPOT.CLIP.TYPE={clip_type!r} expects {expected}; set CLIP.TYPE to "
            "the model the file holds.",
            weights, "MODEL.REGIONSPOT.CLIP.WEIGHTS",
        )
    return model


class ClipDenseFeatures(FrozenModule):
    """
    Frozen CLIP giving the dense feature map of the whole image and encoding text.

    The image is resized to ``input_size`` x ``input_size`` (aspect ratio not kept; bilinear,
    ``align_corners=False``, antialiased only with ``antialias``, on the [0, 1] float image) and normalised with CLIP's
    mean/std. The feature map is the token sequence out of the last residual block, class token
    included, before ``ln_post`` and the projection: [B, 1 + G*G, D_v].
    """

    def __init__(self, model: CLIP, input_size: int, antialias: bool = False):
        """
        Args:
            model: a stock ``clip.model.CLIP``.
            input_size: side S of the square view.
            antialias: antialias the resize to S x S (``MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS``).
        """
        super().__init__()
        self.model = model
        self.input_size = int(input_size)
        self.antialias = bool(antialias)
        patch = model.visual.conv1.kernel_size[0]
        if self.input_size % patch != 0:
            raise ValueError(
                f"MODEL.REGIONSPOT.CLIP.INPUT_SIZE={self.input_size} is not a multiple of CLIP's "
                f"patch size {patch}."
            )
        self.register_buffer("pixel_mean", torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self._pos_cache = None
        # Run from a bf16 copy under FROZEN.PRECISION bf16 (see FrozenModule); the text tower stays fp32.
        self.bf16_parts = ("model.visual",)
        self.bf16_keep_fp32 = (ClipLayerNorm,)
        self.freeze()

    @property
    def width(self) -> int:
        """D_v: width of the visual tokens."""
        return self.model.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        """D_t: width of the joint image-text space."""
        return self.model.text_projection.shape[1]

    @property
    def num_tokens(self) -> int:
        g = self.input_size // self.model.visual.conv1.kernel_size[0]
        return 1 + g * g

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of CLIP's stored logit scale (100 for the OpenAI checkpoints), as a 0-d tensor."""
        return self.model.logit_scale.detach().float().exp()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def positional_embedding(self) -> torch.Tensor:
        """[1 + G*G, D_v] positional embedding for ``input_size`` (bicubic resize of the patch rows)."""
        pos = self.model.visual.positional_embedding
        g0 = int(round((pos.shape[0] - 1) ** 0.5))
        g = self.input_size // self.model.visual.conv1.kernel_size[0]
        if g == g0:
            return pos
        cached = self._pos_cache
        if cached is not None and cached[0] is pos and cached[1].device == pos.device and cached[1].dtype == pos.dtype:
            return cached[1]
        patch_rows = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        patch_rows = F.interpolate(patch_rows.float(), size=(g, g), mode="bicubic", align_corners=False)
        patch_rows = patch_rows.permute(0, 2, 3, 1).reshape(g * g, -1).to(pos.dtype)
        resized = torch.cat([pos[:1], patch_rows], dim=0)
        self._pos_cache = (pos, resized)
        return resized

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: [B, 3, H, W] RGB, float in [0, 1].

        Returns:
            [B, 3, S, S] normalised CLIP input.
        """
        x = F.interpolate(
            images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=self.antialias
        )
        return (x - self.pixel_mean) / self.pixel_std

    def image_to_tensor(self, image) -> torch.Tensor:
        """
        [3, H, W] uint8 RGB tensor (any device) or [H, W, 3] uint8 RGB numpy -> [1, 3, H, W] float
        in [0, 1] on this module's device.
        """
        if isinstance(image, np.ndarray):
            image = torch.as_tensor(image).permute(2, 0, 1)
        return image.to(self.device)[None].float() / 255.0

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor, preprocessed: bool = False) -> torch.Tensor:
        """
        Args:
            images: [B, 3, H, W] RGB float in [0, 1] (see :meth:`image_to_tensor`), or, with
                ``preprocessed``, the [B, 3, S, S] output of :meth:`preprocess` (images of
                different sizes are preprocessed one by one, then stacked).

        Returns:
            [B, 1 + G*G, D_v] token sequence of the last transformer block.
        """
        visual = self.part("model.visual")  # its bf16 copy under FROZEN.PRECISION bf16
        dtype = visual.conv1.weight.dtype
        x = images.to(self.device) if preprocessed else self.preprocess(images.to(self.device))
        x = x.to(dtype)
        with self.autocast():
            x = visual.conv1(x)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self.positional_embedding().to(x.dtype)
            x = visual.ln_pre(x)
            x = visual.transformer(x.permute(1, 0, 2))  # clip's blocks take [L, B, D]
        return x.permute(1, 0, 2).float()

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, stock: bool = False) -> torch.Tensor:
        """
        Un-normalised sentence embeddings of CLIP's text tower.

        By default the tower runs over the first L positions only, L = 1 + the last end-of-text
        (EOT) position in the batch (class-name prompts use about 4-25 of the 77). This is exact:
        the tower's attention mask is causal, so no position before L sees one at or after L, and
        the embedding is read at the EOT token. The forward is clip's (``CLIP.encode_text``,
        ``ResidualAttentionBlock``) written out over the stock modules' weights, batch-first and
        with ``scaled_dot_product_attention`` (fewer copies than ``nn.MultiheadAttention``); the
        model is not changed. The result equals clip's ``CLIP.encode_text`` up to float rounding
        (below 1e-5 in fp32; the matrix shapes differ, so not bit for bit). A tower this cannot
        reproduce exactly (a mask that lets a position see a later one, attention with extra
        key/value biases) runs the stock forward instead.

        Args:
            tokens: [K, N] token ids as ``clip.tokenize`` makes them (N = 77; EOT has the highest
                id, zeros after it).
            stock: run clip's own ``CLIP.encode_text`` over all N positions instead (the
                reference for tests and benchmarks).

        Returns:
            [K, D_t] float32.
        """
        model = self.model
        tokens = tokens.to(self.device)
        # Always fp32: the embedding cache does not depend on FROZEN.PRECISION.
        if stock or tokens.shape[0] == 0:
            return model.encode_text(tokens).float()
        n_ctx = tokens.shape[-1]
        eot = tokens.argmax(dim=-1)  # clip's rule: the EOT token has the highest id
        length = int(eot.max()) + 1
        masks = []
        for block in model.transformer.resblocks:
            # The part of the mask clip's ResidualAttentionBlock uses for n_ctx positions.
            mask = None if block.attn_mask is None else block.attn_mask[..., -n_ctx:, -n_ctx:]
            attn = block.attn
            exact = (
                mask is not None
                and bool(torch.isneginf(mask[..., :length, length:]).all())
                and attn.in_proj_weight is not None
                and attn.bias_k is None
                and not attn.add_zero_attn
            )
            if not exact:
                if not getattr(self, "_warned_stock_text", False):
                    logger.warning("CLIP's text tower is not the stock causal one: encoding text at the full context.")
                    self._warned_stock_text = True
                return model.encode_text(tokens).float()
            masks.append(mask[..., :length, :length])
        dtype = model.dtype
        x = model.token_embedding(tokens[:, :length]).type(dtype) + model.positional_embedding[:length].type(dtype)
        batch, width = x.shape[0], x.shape[-1]
        for block, mask in zip(model.transformer.resblocks, masks):
            attn = block.attn
            heads = attn.num_heads
            # nn.MultiheadAttention's packed q, k, v projection, then attention per head.
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(dtype=x.dtype, device=x.device))
            x = x + attn.out_proj(h.transpose(1, 2).reshape(batch, length, width))
            x = x + block.mlp(block.ln_2(x))
        x = model.ln_final(x).type(dtype)
        return (x[torch.arange(batch, device=x.device), eot] @ model.text_projection).float()
