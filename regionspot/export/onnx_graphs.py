"""
The RegionSpot predictor as ONNX graphs, and :func:`export_model` writing them with a manifest.

Five graphs reproduce :class:`regionspot.RegionSpotPredictor` (the runtime side is
:class:`regionspot.export.OnnxRegionSpotPredictor`, which needs no torch):

=====================  ========================================================================
``sam_encoder.onnx``   [1, 3, h, w] uint8 RGB, SAM's resized view -> normalised, padded, encoded:
                       ``image_embedding`` [1, C, g, g]
``sam_decoder.onnx``   ``image_embedding``, ``point_coords`` [N, P, 2] (SAM's frame),
                       ``point_labels`` [N, P] (-1 pad, 0 background, 1 foreground, 2 / 3 box
                       corners) -> ``tokens`` [N, C], ``low_res_masks`` [N, 1, 4g, 4g], ``iou`` [N]
``clip_image.onnx``    [1, 3, S, S] float RGB in [0, 1] (the bilinear S x S view) ->
                       ``clip_features`` [1, L, D_v]
``head.onnx``          ``tokens`` [N, C], ``clip_features``, ``text_embeddings`` [K, D_t] ->
                       ``logits`` [N, K], ``scores`` [N, K], ``region_embeddings`` [N, D_t]
                       (L2-normalised). With a baked vocabulary ``text_embeddings`` is a constant.
``text.onnx``          ``text_tokens`` [M, T] int64 (CLIP's BPE ids, T <= 77) ->
                       ``text_features`` [M, D_t] (one sentence embedding each, not normalised)
=====================  ========================================================================

Boxes reach the decoder as two corner points labelled 2 and 3, which is how SAM's prompt encoder
embeds them (a box's corners get the third and fourth point embeddings); prompts without a box get
one padding point labelled -1, as the prompt encoder pads them. Top-k, NMS and the mask
up-sampling stay outside the graphs.
"""
import copy
import json
import logging
import os
import shutil
import time
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..engine.fingerprints import state_dict_sha256
from ..modeling.clip_features import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from ..modeling.sam_fast import decode_prompts_fast

logger = logging.getLogger(__name__)

__all__ = [
    "SamEncoderGraph",
    "SamDecoderGraph",
    "ClipImageGraph",
    "RegionHeadGraph",
    "TextTowerGraph",
    "export_model",
    "MANIFEST_NAME",
    "FORMAT_NAME",
    "GRAPH_FILES",
]

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "regionspot-onnx"
FORMAT_VERSION = 1
GRAPH_FILES = {
    "sam_encoder": "sam_encoder.onnx",
    "sam_decoder": "sam_decoder.onnx",
    "clip_image": "clip_image.onnx",
    "head": "head.onnx",
    "text": "text.onnx",
}
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


class SamEncoderGraph(nn.Module):
    """SAM's resized uint8 view -> its image embedding (normalisation and padding as ``Sam.preprocess``)."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sam = self.sam
        x = (image.float() - sam.pixel_mean) / sam.pixel_std
        size = sam.image_encoder.img_size
        x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
        return sam.image_encoder(x)


class SamDecoderGraph(nn.Module):
    """
    SAM's prompt encoder (points and box corners, no mask prompt) and its mask decoder in
    single-mask mode, returning the region token (mask token 0 after the two-way transformer), in the
    torch path's factored form (``sam_fast.decode_prompts_fast``) with every length dynamic.
    """

    def __init__(self, sam):
        super().__init__()
        self.sam = sam

    def sparse_embeddings(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.sam.prompt_encoder
        emb = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)  # [N, P, C]
        labels = labels[..., None]
        for k, point in enumerate(pe.point_embeddings):  # background, foreground, box corners
            emb = emb + (labels == k).to(emb.dtype) * point.weight
        pad = (labels == -1).to(emb.dtype)
        return emb * (1 - pad) + pad * pe.not_a_point_embed.weight

    def forward(self, image_embedding, point_coords, point_labels):
        """
        ``MaskDecoder`` in single-mask mode (its ``predict_masks``, mask 0) in the factored form the torch
        path runs (:func:`regionspot.modeling.sam_fast.decode_prompts_fast`: the image side of the first
        block once for all prompts, the cross-attentions re-associated so the image tokens are never
        projected per prompt; same outputs up to rounding), with the number of prompts dynamic.
        """
        sam = self.sam
        sparse = self.sparse_embeddings(point_coords, point_labels)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        token, masks, iou = decode_prompts_fast(sam, image_embedding, sparse, dense, with_masks=True)
        return token, masks, iou


class ClipImageGraph(nn.Module):
    """CLIP's resized [0, 1] view -> its dense feature map (``ClipDenseFeatures.dense_features``)."""

    def __init__(self, clip_features):
        super().__init__()
        self.clip = clip_features
        with torch.no_grad():  # resized to the input size outside the graph: a constant of it
            self.register_buffer("pos", clip_features.positional_embedding().detach().float().clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        visual = clip.model.visual
        x = (image - clip.pixel_mean) / clip.pixel_std
        x = visual.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        x = visual.ln_pre(x)
        x = visual.transformer(x.permute(1, 0, 2))
        return x.permute(1, 0, 2)


class RegionHeadGraph(nn.Module):
    """Region tokens + CLIP map -> region embeddings, scored against text embeddings (an input, or baked)."""

    def __init__(self, fusion, logit_scale: torch.Tensor, class_score: str, text_embeddings: Optional[torch.Tensor] = None):
        super().__init__()
        self.fusion = fusion
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).clone())
        self.class_score = class_score
        self.baked = text_embeddings is not None
        if self.baked:
            self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())

    @staticmethod
    def _attention(mha, query, key, value):
        """``nn.MultiheadAttention`` (packed projections, no mask) on one image's [L, C] sequences."""
        width = query.shape[-1]
        heads = mha.num_heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

        def split(x):  # [L, C] -> [heads, L, C / heads], the length left dynamic
            return x.reshape(-1, heads, width // heads).transpose(0, 1)

        q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return mha.out_proj(out.transpose(0, 1).reshape(-1, width))

    def _fusion(self, tokens, clip_features):
        """``RegionSpotFusion.forward`` for one image in eval mode (post-norm decoder layers), [N, D_t]."""
        fusion = self.fusion
        memory = clip_features[0]
        x = fusion.to_clip(tokens)
        for layer in fusion.decoder.layers:
            x = layer.norm1(x + self._attention(layer.self_attn, x, x, x))
            x = layer.norm2(x + self._attention(layer.multihead_attn, x, memory, memory))
            x = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
        if fusion.decoder.norm is not None:
            x = fusion.decoder.norm(x)
        return fusion.projector(x)

    def _score(self, tokens, clip_features, text_embeddings):
        region = self._fusion(tokens, clip_features)
        # As region_text_logits (zero_shot_classifier.py).
        region = region / (region.norm(dim=-1, keepdim=True) + 1e-7)
        logits = self.logit_scale * region @ text_embeddings.t()
        scores = logits.sigmoid() if self.class_score == "sigmoid" else logits.softmax(dim=-1)
        return logits, scores, region

    def forward(self, tokens, clip_features, text_embeddings=None):
        if self.baked:
            text_embeddings = self.text_embeddings
        return self._score(tokens, clip_features, text_embeddings)


class TextTowerGraph(nn.Module):
    """
    CLIP's text tower over the first T positions (T = the input's length; CLIP's mask is causal,
    so this equals the full 77-token context for sentences that end before T), as
    ``ClipDenseFeatures.encode_text`` computes it.
    """

    def __init__(self, clip_model):
        super().__init__()
        self.model = clip_model

    def forward(self, text_tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        length = text_tokens.shape[1]
        x = model.token_embedding(text_tokens) + model.positional_embedding[:length]
        batch, width = x.shape[0], x.shape[-1]
        for block in model.transformer.resblocks:
            attn = block.attn
            heads = attn.num_heads
            mask = block.attn_mask[:length, :length]
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + attn.out_proj(h.transpose(1, 2).reshape(batch, length, width))
            x = x + block.mlp(block.ln_2(x))
        x = model.ln_final(x)
        eot = text_tokens.argmax(dim=-1)
        picked = torch.gather(x, 1, eot[:, None, None].expand(-1, 1, width))[:, 0]
        return picked @ model.text_projection


def _stock_encoder(sam):
    """A copy of SAM whose image-encoder attention runs the stock forward (no per-instance fused one)."""
    sam = copy.deepcopy(sam)
    for module in sam.image_encoder.modules():
        module.__dict__.pop("forward", None)
    return sam


def _export(module, args, path, input_names, output_names, dynamic_axes, opset):
    module.eval()
    # nn.MultiheadAttention's fused inference kernel has no ONNX form: the composed forward is traced.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module, args, path, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def model_fingerprints(head) -> Dict[str, str]:
    """SHA-256 of the state dicts of SAM, CLIP and the fusion module (see ``engine.fingerprints``)."""
    return {
        "sam": state_dict_sha256(head.sam.sam),
        "clip": state_dict_sha256(head.clip.model),
        "fusion": state_dict_sha256(head.fusion),
    }


def _bpe_path() -> str:
    import clip.simple_tokenizer as st  # its folder ships CLIP's BPE merges

    return os.path.join(os.path.dirname(os.path.abspath(st.__file__)), BPE_FILE)


def export_model(
    predictor,
    output_dir: str,
    bake_vocabulary: Optional[Sequence[str]] = None,
    opset: int = 17,
    variant: str = "",
) -> dict:
    """
    Write the five graphs, CLIP's BPE vocabulary and ``manifest.json`` into ``output_dir``.

    Args:
        predictor: a :class:`regionspot.RegionSpotPredictor` (its weights are exported).
        output_dir: created if missing; existing graph files are replaced.
        bake_vocabulary: class names whose text embeddings become a constant of ``head.onnx``
            (which then takes no ``text_embeddings`` input); default: the vocabulary is an input.
        opset: ONNX opset.
        variant: a name for the manifest (e.g. the config file's).

    Returns:
        the manifest (also written).
    """
    head = predictor.head
    sam, clip = head.sam, head.clip
    if sam.precision != "fp32" or clip.precision != "fp32":
        raise ValueError("Export runs the frozen models in fp32: set MODEL.REGIONSPOT.FROZEN.PRECISION fp32.")
    os.makedirs(output_dir, exist_ok=True)
    cpu = torch.device("cpu")
    device = head.pixel_mean.device
    if device != cpu:
        raise ValueError("Export runs on the CPU: build the predictor with MODEL.DEVICE cpu.")
    stock = sam.sam
    img_size = stock.image_encoder.img_size
    grid = stock.prompt_encoder.image_embedding_size
    token_dim = sam.token_dim
    timings = {}

    def path(name):
        return os.path.join(output_dir, GRAPH_FILES[name])

    # SAM image encoder: the fused attention when it exports, else the stock forward.
    t0 = time.perf_counter()
    image = torch.randint(0, 256, (1, 3, img_size * 3 // 4, img_size), dtype=torch.uint8)
    encoder_attention = "fused" if sam.fast else "stock"
    try:
        _export(SamEncoderGraph(stock), (image,), path("sam_encoder"), ["image"], ["image_embedding"],
                {"image": {2: "height", 3: "width"}}, opset)
    except Exception as e:  # noqa: BLE001 - any exporter failure falls back to the stock forward
        if encoder_attention == "stock":
            raise
        logger.warning(f"The fused encoder attention did not export ({type(e).__name__}: {e}); exporting the stock one.")
        encoder_attention = "stock"
        _export(SamEncoderGraph(_stock_encoder(stock)), (image,), path("sam_encoder"), ["image"], ["image_embedding"],
                {"image": {2: "height", 3: "width"}}, opset)
    timings["sam_encoder"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    embedding = torch.randn(1, token_dim, *grid)
    coords = torch.rand(3, 3, 2) * img_size
    labels = torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0], [2.0, 3.0, -1.0]])
    _export(SamDecoderGraph(stock), (embedding, coords, labels), path("sam_decoder"),
            ["image_embedding", "point_coords", "point_labels"], ["tokens", "low_res_masks", "iou"],
            {"point_coords": {0: "num_prompts", 1: "num_points"}, "point_labels": {0: "num_prompts", 1: "num_points"},
             "tokens": {0: "num_prompts"}, "low_res_masks": {0: "num_prompts"}, "iou": {0: "num_prompts"}}, opset)
    timings["sam_decoder"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    s = clip.input_size
    _export(ClipImageGraph(clip), (torch.rand(1, 3, s, s),), path("clip_image"), ["image"], ["clip_features"], None, opset)
    timings["clip_image"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    classifier = head.classifier
    baked = None
    if bake_vocabulary:
        baked = list(bake_vocabulary)
        classifier_embeddings = classifier._encode(baked) if baked != classifier.class_names else classifier.text_embeddings
        graph = RegionHeadGraph(head.fusion, classifier.logit_scale, classifier.class_score, classifier_embeddings.cpu())
        args = (torch.randn(4, token_dim), torch.randn(1, clip.num_tokens, clip.width))
        names = ["tokens", "clip_features"]
    else:
        graph = RegionHeadGraph(head.fusion, classifier.logit_scale, classifier.class_score)
        text = F.normalize(torch.randn(5, clip.embed_dim), dim=-1)
        args = (torch.randn(4, token_dim), torch.randn(1, clip.num_tokens, clip.width), text)
        names = ["tokens", "clip_features", "text_embeddings"]
    axes = {"tokens": {0: "num_regions"}, "logits": {0: "num_regions", 1: "num_classes"},
            "scores": {0: "num_regions", 1: "num_classes"}, "region_embeddings": {0: "num_regions"}}
    if not baked:
        axes["text_embeddings"] = {0: "num_classes"}
    _export(graph, args, path("head"), names, ["logits", "scores", "region_embeddings"], axes, opset)
    timings["head"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    context = int(clip.model.positional_embedding.shape[0])
    tokens = torch.zeros(3, 9, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:4] = torch.randint(1, 40000, (3, 3))
    tokens[:, 4] = 49407
    _export(TextTowerGraph(clip.model), (tokens,), path("text"), ["text_tokens"], ["text_features"],
            {"text_tokens": {0: "num_sentences", 1: "length"}, "text_features": {0: "num_sentences"}}, opset)
    timings["text"] = time.perf_counter() - t0
    shutil.copyfile(_bpe_path(), os.path.join(output_dir, BPE_FILE))

    rs = predictor.cfg.MODEL.REGIONSPOT
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "sam_type": rs.SAM.TYPE,
        "clip_type": rs.CLIP.TYPE,
        "opset": opset,
        "graphs": dict(GRAPH_FILES),
        "bpe_vocabulary": BPE_FILE,
        "sam": {
            # segment_anything's ResizeLongestSide(target_length) then Sam.preprocess.
            "resize_longest_side": int(img_size),
            "pixel_mean": [float(v) for v in stock.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in stock.pixel_std.flatten()],
            "embedding_size": [int(g) for g in grid],
            "token_dim": int(token_dim),
            "low_res_mask_size": int(grid[0] * 4),
            "mask_threshold": float(stock.mask_threshold),
            "encoder_attention": encoder_attention,
        },
        "clip": {
            "input_size": int(s),
            "pixel_mean": list(CLIP_PIXEL_MEAN),
            "pixel_std": list(CLIP_PIXEL_STD),
            "resize": "bilinear, align_corners=False",
            "antialias": bool(clip.antialias),
            "num_tokens": int(clip.num_tokens),
            "width": int(clip.width),
            "embed_dim": int(clip.embed_dim),
            "context_length": context,
            "logit_scale": float(classifier.logit_scale),
        },
        "class_score": classifier.class_score,
        "prompt_templates": list(_templates(classifier)),
        "baked_vocabulary": baked,
        "fingerprints": {k + "_state_dict_sha256": v for k, v in model_fingerprints(head).items()},
        "weights": {"model": predictor.cfg.MODEL.WEIGHTS, "sam": rs.SAM.WEIGHTS, "clip": rs.CLIP.WEIGHTS,
                    "random_init_seed": int(rs.FROZEN.SEED) if rs.FROZEN.RANDOM_INIT else None},
        "export_seconds": {k: round(v, 2) for k, v in timings.items()},
        "torch_version": torch.__version__,
    }
    with open(os.path.join(output_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _templates(classifier) -> Sequence[str]:
    encoder = classifier.text_encoder
    templates = getattr(encoder, "templates", None)
    if templates is None:
        from ..modeling.text_embeddings import PROMPT_TEMPLATES

        templates = PROMPT_TEMPLATES
    return templates
