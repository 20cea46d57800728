"""
Faster forwards for the stock ``segment_anything`` modules, using their own weights (nothing of SAM
is copied: the modules are composed, and their attention is re-expressed).

* Image-encoder attention through ``F.scaled_dot_product_attention`` with SAM's decomposed relative-
  position terms (``Rh[q, k_row] + Rw[q, k_col]``) as its additive ``attn_mask``, built one head at a
  time in the 64 x 64 global blocks. The stock code materialises the logits of all heads, adds the
  terms and soft-maxes in separate passes over 12 x 4096 x 4096 floats; the fused kernel does one.
"""
import types

import torch
from torch.nn import functional as F

from segment_anything.modeling.image_encoder import Attention, get_rel_pos

__all__ = ["use_fused_encoder_attention"]


# Heads whose relative-position bias is built at once: bounds the bias to heads x (H*W)^2 floats
# (64 MiB per head for SAM's 64 x 64 global attention).
_BIAS_HEADS_PER_STEP = 1


def _fused_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, heads, H*W, C]
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    else:
        c = q.shape[-1]
        r_q = q.reshape(b, self.num_heads, h, w, c)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))  # [B, n, H, W, H]
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))  # [B, n, H, W, W]
        # Small windows: all heads at once; global attention: a few heads at a time.
        step = self.num_heads if h * w <= 1024 else _BIAS_HEADS_PER_STEP
        outs = []
        for n in range(0, self.num_heads, step):
            heads = slice(n, n + step)
            bias = (rel_h[:, heads, :, :, :, None] + rel_w[:, heads, :, :, None, :]).reshape(b, -1, h * w, h * w)
            outs.append(F.scaled_dot_product_attention(q[:, heads], k[:, heads], v[:, heads], attn_mask=bias, scale=self.scale))
        out = torch.cat(outs, dim=1)
    out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
    return self.proj(out)


def use_fused_encoder_attention(sam) -> int:
    """
    Switch every attention module of ``sam.image_encoder`` to the fused forward (per instance;
    the package's classes are untouched). Returns the number of modules switched.
    """
    n = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_fused_attention_forward, module)
            n += 1
    return n


# -------------------------------------------------------------------------------------------
# Prompt decoding. Without a mask prompt, every box/point prompt of an image starts from the same
# image tokens, so in the first two-way block the image side of both cross-attentions (keys and
# values of token->image, queries of image->token) is projected once per image instead of once per
# prompt. Masks (output up-scaling and the hypernetwork) are computed only when asked for, and only
# for the single-mask output.


def _heads(attn, x):
    return attn._separate_heads(x, attn.num_heads)


def _attend(attn, q, k, v):
    """Stock ``segment_anything`` Attention after its input projections (q, k, v: [B, n, d])."""
    out = F.scaled_dot_product_attention(_heads(attn, q), _heads(attn, k), _heads(attn, v))
    return attn.out_proj(attn._recombine_heads(out))


def _first_block_shared_image(block, queries, query_pe, image, image_pe):
    """TwoWayAttentionBlock.forward when all prompts share the image tokens ``image`` [1, HW, C]."""
    b = queries.shape[0]
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    queries = block.norm1(queries)

    t2i = block.cross_attn_token_to_image
    # Keys and values projected once; every prompt's tokens attend to them as one batch of b * T
    # queries (attention rows are independent), so no per-prompt (or broadcast) copy is made.
    k_img, v_img = t2i.k_proj(image + image_pe), t2i.v_proj(image)
    q = t2i.q_proj(queries + query_pe)
    attended = _attend(t2i, q.reshape(1, -1, q.shape[-1]), k_img, v_img).view(b, -1, queries.shape[-1])
    queries = block.norm2(queries + attended)
    queries = block.norm3(queries + block.mlp(queries))

    i2t = block.cross_attn_image_to_token
    q_img = i2t.q_proj(image + image_pe).expand(b, -1, -1)
    tokens = queries + query_pe
    keys = block.norm4(image + _attend(i2t, q_img, i2t.k_proj(tokens), i2t.v_proj(queries)))
    return queries, keys


def decode_prompts_fast(sam, image_embedding, sparse, dense, with_masks: bool):
    """
    Output of ``MaskDecoder`` in single-mask mode, plus the region token, for prompts without a
    mask input.

    Args:
        sam: stock ``Sam``.
        image_embedding: [1, C, g, g].
        sparse: [B, T, C] sparse prompt embeddings; dense: [1 or B, C, g, g] (identical per prompt).
        with_masks: also compute the [B, 1, 4g, 4g] low-resolution mask logits.

    Returns:
        tokens [B, C], low-res masks or None, IoU predictions [B].
    """
    dec = sam.mask_decoder
    transformer = dec.transformer
    b = sparse.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    point_embedding = torch.cat([output_tokens[None].expand(b, -1, -1), sparse], dim=1)
    _, c, h, w = image_embedding.shape
    image = (image_embedding + dense[:1]).flatten(2).permute(0, 2, 1)  # [1, HW, C]
    image_pe = sam.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)

    queries, keys = _first_block_shared_image(transformer.layers[0], point_embedding, point_embedding, image, image_pe)
    for block in transformer.layers[1:]:
        queries, keys = block(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
    final = transformer.final_attn_token_to_image
    queries = transformer.norm_final_attn(queries + final(q=queries + point_embedding, k=keys + image_pe, v=keys))

    iou = dec.iou_prediction_head(queries[:, 0])[:, 0]
    tokens = queries[:, 1]
    if not with_masks:
        return tokens, None, iou
    src = keys.transpose(1, 2).reshape(b, c, h, w)
    upscaled = dec.output_upscaling(src)
    hyper = dec.output_hypernetworks_mlps[0](tokens)  # single-mask output only
    masks = (hyper[:, None] @ upscaled.flatten(2)).view(b, 1, *upscaled.shape[-2:])
    return tokens, masks, iou
