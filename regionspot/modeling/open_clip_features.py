"""
OpenCLIP models (``open_clip_torch``: OpenAI-layout ViTs trained by LAION, MetaCLIP, DFN, ... and
EVA02-CLIP through timm) as the head's vision-language model.

The dense map is taken where :class:`~regionspot.modeling.clip_features.ClipDenseFeatures` takes it
for OpenAI's CLIP: the tokens out of the last transformer block, prefix (class) token first, before
the final norm, pooling and projection. Text goes through the model's own tokenizer
(``open_clip.get_tokenizer``) and ``encode_text``. Models are built from open_clip's own model
configs (``open_clip.create_model(name, pretrained=None)``); weights come from a file
(``open_clip.load_checkpoint``), never from a hub.
"""
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .frozen import FrozenModule, seeded
from .model_registry import VLM_REGISTRY
from .weights import WeightsFileError

logger = logging.getLogger(__name__)

__all__ = ["OpenClipDenseFeatures", "build_open_clip", "open_clip_tokenizer", "TokenizerFilesMissing", "TINY_OPEN_CLIP", "TINY_EVA02_CLIP"]

TINY_OPEN_CLIP = "RegionSpot-tiny-OpenCLIP"  # a small OpenAI-layout ViT (open_clip's VisionTransformer)
TINY_EVA02_CLIP = "RegionSpot-tiny-EVA02"  # timm's eva02_tiny behind open_clip's TimmModel
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "open_clip_configs")


class TokenizerFilesMissing(FileNotFoundError):
    """An OpenCLIP model whose tokenizer open_clip would download (Hugging Face tokenizers)."""


def _open_clip():
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)  # the tiny presets, through open_clip's config mechanism
    return open_clip


def _model_config(name: str) -> dict:
    open_clip = _open_clip()
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(
            f"MODEL.REGIONSPOT.VLM.TYPE={name!r} is not an open_clip model config; use one of open_clip.list_models() "
            f"(e.g. 'ViT-B-16', 'EVA02-B-16', 'ViT-B-16-quickgelu' for MetaCLIP, 'ViT-H-14-quickgelu' for DFN) or "
            f"{TINY_OPEN_CLIP!r}."
        )
    return config


def open_clip_tokenizer(name: str, tokenizer_dir: str = ""):
    """
    The model's own tokenizer, without any download.

    Models with open_clip's bundled BPE vocabulary (OpenAI, LAION, MetaCLIP, DFN, EVA02 configs) need
    nothing. Models whose config names a Hugging Face tokenizer (``hf_tokenizer_name``) or a SigLIP
    tokenizer need its files: ``tokenizer_dir`` (``MODEL.REGIONSPOT.VLM.TOKENIZER``) is a folder holding
    them (``tokenizer.json``, ``tokenizer_config.json``, ... as saved by ``save_pretrained``).

    Raises:
        TokenizerFilesMissing: such a model without ``tokenizer_dir``, or a folder without those files.
    """
    open_clip = _open_clip()
    text_cfg = _model_config(name).get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    siglip = "siglip" in name.lower()
    context_length = text_cfg.get("context_length", 77)
    if not hf_name and not siglip:
        return open_clip.get_tokenizer(name)
    wanted = hf_name or f"the SigLIP tokenizer of {name}"
    how = (
        f"download the tokenizer files of {wanted!r} (tokenizer.json, tokenizer_config.json, special_tokens_map.json; "
        "e.g. with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(folder) on a machine with access), "
        "install the transformers package, and set MODEL.REGIONSPOT.VLM.TOKENIZER to that folder"
    )
    if not tokenizer_dir:
        raise TokenizerFilesMissing(
            f"MODEL.REGIONSPOT.VLM.TYPE={name!r} tokenizes text with the Hugging Face tokenizer {wanted!r}, whose files "
            f"open_clip would download at run time; nothing is downloaded here. Missing: {wanted!r}'s tokenizer.json. "
            f"To use this model, {how}."
        )
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) and not os.path.isfile(
        os.path.join(tokenizer_dir, "tokenizer_config.json")
    ):
        raise TokenizerFilesMissing(
            f"MODEL.REGIONSPOT.VLM.TOKENIZER={tokenizer_dir!r} holds no tokenizer.json or tokenizer_config.json "
            f"(the files of {wanted!r}); {how}."
        )
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(tokenizer_dir, context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    except ImportError as e:
        raise TokenizerFilesMissing(
            f"MODEL.REGIONSPOT.VLM.TOKENIZER={tokenizer_dir!r}: reading a Hugging Face tokenizer needs the transformers "
            f"package ({e})."
        ) from e


def build_open_clip(name: str, weights: str = "", random_init: bool = False, seed: int = 0):
    """
    ``open_clip.create_model(name, pretrained=None)`` in fp32 eval mode on the CPU: seeded random
    weights, or ``weights`` (an open_clip checkpoint file, ``.pt`` / ``.bin`` / ``.safetensors``)
    loaded by ``open_clip.load_checkpoint``.

    Raises:
        ValueError: unknown name, or empty ``weights`` without ``random_init``.
        FileNotFoundError: ``weights`` does not exist.
        regionspot.modeling.weights.WeightsFileError: ``weights`` does not fit the model.
    """
    open_clip = _open_clip()
    _model_config(name)
    if not weights and not random_init:
        raise ValueError(
            f"MODEL.REGIONSPOT.VLM.WEIGHTS is empty: point it at the open_clip checkpoint of VLM.TYPE={name!r} "
            "(e.g. its open_clip_pytorch_model.bin), or set MODEL.REGIONSPOT.FROZEN.RANDOM_INIT=True for random "
            "stand-in weights (tests only)."
        )
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.REGIONSPOT.VLM.WEIGHTS={weights!r} does not exist. Give the path of the open_clip checkpoint of "
            f"VLM.TYPE={name!r}."
        )
    with seeded(seed):
        model = open_clip.create_model(name, pretrained=None, device="cpu", precision="fp32")
    if weights:
        try:
            open_clip.load_checkpoint(model, weights)
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise WeightsFileError(
                f"MODEL.REGIONSPOT.VLM.WEIGHTS={weights!r} is not a checkpoint of the open_clip model "
                f"VLM.TYPE={name!r}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}",
                weights, "MODEL.REGIONSPOT.VLM.WEIGHTS",
            ) from e
    return model.float().eval()


@VLM_REGISTRY.register()
class OpenClipDenseFeatures(FrozenModule):
    """
    Frozen OpenCLIP model: the dense feature map [B, 1 + G*G, D_v] of the image's square view
    (resized as :class:`ClipDenseFeatures` does, normalised with the model's own mean / std), and
    text embeddings through the model's tokenizer and ``encode_text``.

    Two vision towers are read: open_clip's ``VisionTransformer`` (OpenAI, LAION, MetaCLIP, DFN; the
    positional embedding is resized bicubically for another view size, as for OpenAI's CLIP) and
    ``TimmModel`` (EVA02-CLIP; timm's ``forward_intermediates`` of the last block, un-normed, at the
    tower's native size).
    """

    def __init__(self, model, tokenizer, input_size: int = 0, antialias: bool = False, embed_dim: Optional[int] = None):
        """
        Args:
            model: an ``open_clip`` CLIP / CustomTextCLIP.
            tokenizer: its tokenizer (``open_clip_tokenizer``).
            input_size: side S of the square view; 0: the tower's native size.
            antialias: antialias the resize to S x S.
            embed_dim: D_t (default: read from a one-sentence text forward).
        """
        super().__init__()
        import open_clip

        self.model = model
        self.tokenizer = tokenizer
        visual = model.visual
        self.timm_tower = hasattr(visual, "trunk")
        if self.timm_tower:
            trunk = visual.trunk
            native = int(trunk.patch_embed.img_size[0])
            self.patch_size = int(trunk.patch_embed.patch_size[0])
            self._width = int(trunk.embed_dim)
            self._prefix = int(getattr(trunk, "num_prefix_tokens", 1))
        elif hasattr(visual, "conv1") and hasattr(visual, "transformer"):
            native = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size)
            self.patch_size = int(visual.conv1.kernel_size[0])
            self._width = int(visual.conv1.out_channels)
            self._prefix = 1
        else:
            raise ValueError(
                f"OpenClipDenseFeatures reads open_clip's VisionTransformer and TimmModel towers; this model's is a "
                f"{type(visual).__name__} (e.g. a ResNet or ConvNeXt CLIP), which has no token map."
            )
        self.native_size = native
        self.input_size = int(input_size) or native
        if self.input_size % self.patch_size:
            raise ValueError(
                f"MODEL.REGIONSPOT.CLIP.INPUT_SIZE={self.input_size} is not a multiple of the patch size {self.patch_size}."
            )
        if self.timm_tower and self.input_size != native and not getattr(visual.trunk, "dynamic_img_size", False):
            raise ValueError(
                f"MODEL.REGIONSPOT.CLIP.INPUT_SIZE={self.input_size}: this timm tower ({type(visual.trunk).__name__}) "
                f"runs at its native {native} px only; set CLIP.INPUT_SIZE to {native} (or 0)."
            )
        self.antialias = bool(antialias)
        pre = open_clip.get_model_preprocess_cfg(model)
        self.register_buffer("pixel_mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)
        self._embed_dim = embed_dim
        self._pos_cache = None
        self.freeze()
        if self._embed_dim is None:
            self._embed_dim = int(self.encode_text(self.tokenize(["a photo"])).shape[-1])

    @classmethod
    def from_regionspot_config(cls, cfg) -> "OpenClipDenseFeatures":
        rs = cfg.MODEL.REGIONSPOT
        name = rs.VLM.TYPE
        if not name:
            raise ValueError(
                "MODEL.REGIONSPOT.VLM.NAME='OpenClipDenseFeatures' needs MODEL.REGIONSPOT.VLM.TYPE: an open_clip model "
                f"name such as 'EVA02-B-16', 'ViT-B-16-quickgelu' (MetaCLIP) or {TINY_OPEN_CLIP!r}."
            )
        tokenizer = open_clip_tokenizer(name, rs.VLM.TOKENIZER)  # before the (slow) build
        config = _model_config(name)
        model = build_open_clip(name, rs.VLM.WEIGHTS, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED + 1)
        adapter = cls(model, tokenizer, rs.CLIP.INPUT_SIZE, rs.CLIP.RESIZE_ANTIALIAS, embed_dim=config.get("embed_dim"))
        adapter.model_name = name
        return adapter

    @property
    def width(self) -> int:
        """D_v: width of the visual tokens."""
        return self._width

    @property
    def embed_dim(self) -> int:
        """D_t: width of the joint image-text space."""
        return self._embed_dim

    @property
    def num_tokens(self) -> int:
        g = self.input_size // self.patch_size
        return self._prefix + g * g

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] RGB float in [0, 1] -> [B, 3, S, S] normalised view."""
        x = F.interpolate(
            images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=self.antialias
        )
        return (x - self.pixel_mean) / self.pixel_std

    def image_to_tensor(self, image) -> torch.Tensor:
        """[3, H, W] uint8 tensor or [H, W, 3] uint8 numpy -> [1, 3, H, W] float in [0, 1] on the device."""
        if isinstance(image, np.ndarray):
            image = torch.as_tensor(image).permute(2, 0, 1)
        return image.to(self.device)[None].float() / 255.0

    def positional_embedding(self) -> torch.Tensor:
        """[1 + G*G, D_v] positional embedding of the ViT tower for ``input_size`` (bicubic resize)."""
        pos = self.model.visual.positional_embedding
        g0 = int(round((pos.shape[0] - 1) ** 0.5))
        g = self.input_size // self.patch_size
        if g == g0:
            return pos
        cached = self._pos_cache
        if cached is not None and cached[0] is pos and cached[1].device == pos.device:
            return cached[1]
        rows = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        rows = F.interpolate(rows.float(), size=(g, g), mode="bicubic", align_corners=False)
        resized = torch.cat([pos[:1], rows.permute(0, 2, 3, 1).reshape(g * g, -1).to(pos.dtype)], dim=0)
        self._pos_cache = (pos, resized)
        return resized

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor, preprocessed: bool = False) -> torch.Tensor:
        """
        Args:
            images: [B, 3, H, W] RGB float in [0, 1], or with ``preprocessed`` the [B, 3, S, S] view.

        Returns:
            [B, prefix + G*G, D_v] tokens of the last block (before the final norm and projection).
        """
        visual = self.model.visual
        x = images.to(self.device) if preprocessed else self.preprocess(images.to(self.device))
        with self.autocast():
            if self.timm_tower:
                out = visual.trunk.forward_intermediates(
                    x, indices=1, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
                )
                spatial, prefix = out[-1]
                return torch.cat([prefix, spatial], dim=1).float()
            x = visual.conv1(x)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1) + self.positional_embedding().to(x.dtype)
            x = visual.patch_dropout(x)
            x = visual.ln_pre(x)
            x = visual.transformer(x)  # batch-first in and out, whatever the blocks' layout
        return x.float()

    def tokenize(self, sentences: Sequence[str]) -> torch.Tensor:
        """[K, context] token ids of the model's own tokenizer."""
        return self.tokenizer(list(sentences))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, stock: bool = False) -> torch.Tensor:
        """[K, n] token ids -> [K, D_t] un-normalised embeddings (``model.encode_text``, fp32)."""
        del stock  # the model's own forward is the only path
        return self.model.encode_text(tokens.to(self.device)).float()
