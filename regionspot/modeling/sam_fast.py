"""
Faster forwards for the stock ``segment_anything`` modules, using their own weights (nothing of SAM
is copied: the modules are composed, and their attention is re-expressed).

* Image-encoder attention through ``F.scaled_dot_product_attention`` with SAM's decomposed relative-
  position terms (``Rh[q, k_row] + Rw[q, k_col]``) as its additive ``attn_mask``, built one head at a
  time in the 64 x 64 global blocks. The stock code materialises the logits of all heads, adds the
  terms and soft-maxes in separate passes over 12 x 4096 x 4096 floats; the fused kernel does one.
* Prompt decoding (:func:`decode_prompts_fast`): the image side shared by all prompts in the first
  block, and the cross-attentions re-associated so the image tokens are never projected per prompt.
"""
import math
import types

import torch
from torch.nn import functional as F

from segment_anything.modeling.image_encoder import Attention, get_rel_pos

__all__ = ["use_fused_encoder_attention"]


# Heads whose relative-position bias is built at once: bounds the bias to heads x (H*W)^2 floats
# (64 MiB per head for SAM's 64 x 64 global attention).
_BIAS_HEADS_PER_STEP = 1
_EXPANSIONS = {}


def _grid_expansion(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """
    [H + W, H*W] 0/1 matrix E with ``[rel_h, rel_w] @ E = rel_h[..., k_row] + rel_w[..., k_col]`` for
    every key position (k_row, k_col): the broadcast sum of the decomposed relative-position terms as
    one matrix product (each output is the sum of the same two terms, rounded once, as the elementwise
    sum), which the CPU's matrix kernels write far faster than a broadcast add over (H*W)^2 elements.
    """
    key = (h, w, dtype, device)
    if key not in _EXPANSIONS:
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        e = torch.cat([F.one_hot(rows, h).t(), F.one_hot(cols, w).t()], dim=0)
        _EXPANSIONS[key] = e.to(dtype)
    return _EXPANSIONS[key]


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
        # In bf16/fp16 the bias is built by the matrix units (same values, see _grid_expansion); in fp32
        # the broadcast add is the faster of the two on CPUs.
        by_matmul = q.dtype in (torch.bfloat16, torch.float16)
        if by_matmul:
            rel = torch.cat([rel_h, rel_w], dim=-1).reshape(b, self.num_heads, h * w, h + w)
            expansion = _grid_expansion(h, w, rel.dtype, rel.device)
        outs = []
        for n in range(0, self.num_heads, step):
            heads = slice(n, n + step)
            if by_matmul:
                bias = rel[:, heads] @ expansion  # [B, heads, H*W, H*W]
            else:
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
# image tokens, so in the first two-way block the image side of both cross-attentions is computed
# once per image instead of once per prompt. In every cross-attention between the few prompt tokens
# and the 4096 image tokens, the projections of the image side (keys and values of token->image,
# queries and output of image->token) are moved to the token side by associativity, so the large
# [B, 4096, C] tensors meet [C, heads x tokens] products instead of [C, C/2] projections. Masks
# (output up-scaling and the hypernetwork) are computed only when asked for, and only for the
# single-mask output.


def _heads(attn, x):
    return attn._separate_heads(x, attn.num_heads)


def _attend(attn, q, k, v):
    """Stock ``segment_anything`` Attention after its input projections (q, k, v: [B, n, d])."""
    out = F.scaled_dot_product_attention(_heads(attn, q), _heads(attn, k), _heads(attn, v))
    return attn.out_proj(attn._recombine_heads(out))


def _tokens_to_image(attn, q_in, k_in, v_in):
    """
    ``attn(q=q_in, k=k_in, v=v_in)`` for few queries (the T prompt tokens) over many keys (the N
    image tokens), with the key and value projections moved to the query side: per head,
    ``q . (W_k x + b_k) = (W_k^T q) . x + const`` (the constant cancels in the softmax over keys) and
    ``P (W_v x + b_v) = W_v (P x) + b_v`` (rows of P sum to 1). The N x C image side is then read by
    two [h*T, C] x [C, N] products instead of being projected twice; same result up to rounding.

    Args:
        q_in: [B, T, C]; k_in, v_in: [B or 1, N, C].
    """
    b, t, _ = q_in.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    q = attn.q_proj(q_in).view(b, t, h, d)
    q_k = torch.einsum("bthd,hdc->bhtc", q, attn.k_proj.weight.view(h, d, -1)).flatten(1, 2)  # [B, h*T, C]
    scores = (q_k @ k_in.transpose(1, 2)) * (1.0 / math.sqrt(d))  # [B, h*T, N]
    p_v = scores.softmax(dim=-1) @ v_in  # [B, h*T, C]
    out = torch.einsum("bhtc,hdc->bthd", p_v.view(b, h, t, -1), attn.v_proj.weight.view(h, d, -1))
    out = out + attn.v_proj.bias.view(h, d)
    return attn.out_proj(out.reshape(b, t, h * d))


def _image_to_tokens(attn, q_in, k_in, v_in):
    """
    ``attn(q=q_in, k=k_in, v=v_in)`` for many queries (the N image tokens) over few keys (the T
    prompt tokens), with the query and output projections moved to the token side: per head,
    ``(W_q x + b_q) . k = x . (W_q^T k) + b_q . k`` and ``W_o (P v) = P (W_o v)``, so the N x C image
    side meets two [C, h*T] products instead of the query and output projections; same result up to
    rounding.

    Args:
        q_in: [B or 1, N, C]; k_in, v_in: [B, T, C].
    """
    b, t, _ = k_in.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    k = attn.k_proj(k_in).view(b, t, h, d)
    k_q = torch.einsum("bthd,hdc->bhtc", k, attn.q_proj.weight.view(h, d, -1))  # [B, h, T, C]
    k_bias = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.view(h, d))  # [B, h, T]
    # Laid out [B, h, T, N] so that the softmax over the T keys runs along a long contiguous N.
    scores = k_q.flatten(1, 2) @ q_in.transpose(1, 2)  # [B, h*T, N]
    scores = (scores.view(b, h, t, -1) + k_bias[..., None]) * (1.0 / math.sqrt(d))
    v = attn.v_proj(v_in).view(b, t, h, d)
    v_o = torch.einsum("bthd,chd->bhtc", v, attn.out_proj.weight.view(-1, h, d)).flatten(1, 2)  # [B, h*T, C]
    # [B, N, h*T] made contiguous (a fifth of the output's size) so that the product, and the
    # layer norm after it, get a row-major [B, N, C] without a copy of their own.
    probs = scores.softmax(dim=2).flatten(1, 2).transpose(1, 2).contiguous()
    return torch.baddbmm(attn.out_proj.bias, probs, v_o)


def _self_attention(block, queries, query_pe):
    """The self-attention step of ``TwoWayAttentionBlock.forward`` (prompt tokens only)."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    return block.norm1(queries)


def _block(block, queries, keys, query_pe, key_pe):
    """``TwoWayAttentionBlock.forward`` (after the first block) with the factored cross-attentions."""
    queries = _self_attention(block, queries, query_pe)
    keys_pe = keys + key_pe  # the same sum serves both cross-attentions (keys change only after them)
    queries = block.norm2(queries + _tokens_to_image(block.cross_attn_token_to_image, queries + query_pe, keys_pe, keys))
    queries = block.norm3(queries + block.mlp(queries))
    q = queries + query_pe
    keys = block.norm4(keys + _image_to_tokens(block.cross_attn_image_to_token, keys_pe, q, queries))
    return queries, keys


def _first_block_shared_image(block, queries, query_pe, image, image_pe):
    """TwoWayAttentionBlock.forward when all prompts share the image tokens ``image`` [1, HW, C]."""
    b = queries.shape[0]
    queries = _self_attention(block, queries, query_pe)

    t2i = block.cross_attn_token_to_image
    # Keys and values projected once; every prompt's tokens attend to them as one batch of b * T
    # queries (attention rows are independent), so no per-prompt (or broadcast) copy is made.
    k_img, v_img = t2i.k_proj(image + image_pe), t2i.v_proj(image)
    q = t2i.q_proj(queries + query_pe)
    attended = _attend(t2i, q.reshape(1, -1, q.shape[-1]), k_img, v_img).view(b, -1, queries.shape[-1])
    queries = block.norm2(queries + attended)
    queries = block.norm3(queries + block.mlp(queries))

    keys = block.norm4(image + _image_to_tokens(block.cross_attn_image_to_token, image + image_pe,
                                                queries + query_pe, queries))
    return queries, keys


def decode_prompts_fast(sam, image_embedding, sparse, dense, with_masks: bool, mask_decoder=None, image_pe=None):
    """
    Output of ``MaskDecoder`` in single-mask mode, plus the region token, for prompts without a
    mask input.

    Args:
        sam: stock ``Sam``.
        image_embedding: [1, C, g, g].
        sparse: [B, T, C] sparse prompt embeddings; dense: [1 or B, C, g, g] (identical per prompt).
        with_masks: also compute the [B, 1, 4g, 4g] low-resolution mask logits.
        mask_decoder: the decoder to run (default ``sam.mask_decoder``; e.g. a bf16 copy of it). The
            inputs are brought to its dtype.
        image_pe: ``sam.prompt_encoder.get_dense_pe()`` when the caller has it (it is the same for
            every call: sines and cosines of the whole grid).

    Returns:
        tokens [B, C], low-res masks or None, IoU predictions [B], in the decoder's dtype.
    """
    dec = sam.mask_decoder if mask_decoder is None else mask_decoder
    dtype = dec.iou_token.weight.dtype
    image_embedding, sparse, dense = image_embedding.to(dtype), sparse.to(dtype), dense.to(dtype)
    transformer = dec.transformer
    b = sparse.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    point_embedding = torch.cat([output_tokens[None].expand(b, -1, -1), sparse], dim=1)
    _, c, h, w = image_embedding.shape
    # [1, HW, C], made row-major once: results computed from them (the [B, HW, C] keys) inherit it.
    image = (image_embedding + dense[:1]).flatten(2).permute(0, 2, 1).contiguous()
    if image_pe is None:
        image_pe = sam.prompt_encoder.get_dense_pe()
    image_pe = image_pe.to(dtype).flatten(2).permute(0, 2, 1).contiguous()

    queries, keys = _first_block_shared_image(transformer.layers[0], point_embedding, point_embedding, image, image_pe)
    for block in transformer.layers[1:]:
        queries, keys = _block(block, queries, keys, point_embedding, image_pe)
    final = _tokens_to_image(transformer.final_attn_token_to_image, queries + point_embedding, keys + image_pe, keys)
    queries = transformer.norm_final_attn(queries + final)

    iou = dec.iou_prediction_head(queries[:, 0])[:, 0]
    tokens = queries[:, 1]
    if not with_masks:
        return tokens, None, iou
    hyper = dec.output_hypernetworks_mlps[0](tokens)  # single-mask output only
    return tokens, _upscaled_masks(dec, keys, hyper, h, w), iou


def _upscaled_masks(dec, keys, hyper, h, w):
    """
    ``hyper . output_upscaling(keys as [B, C, h, w])`` (the single-mask logits), channels-last
    throughout: the image tokens [B, h*w, C] are already a channels-last image, the transposed
    convolutions keep that layout, the 2-D layer norm is ``F.layer_norm`` over the (contiguous)
    channel axis in one kernel instead of the stock elementwise passes, and the product with the
    hypernetwork output reads the channels-last result without a copy.
    """
    conv1, norm, act1, conv2, act2 = dec.output_upscaling
    b, _, c = keys.shape
    x = conv1(keys.view(b, h, w, c).permute(0, 3, 1, 2))
    channels = int(norm.weight.shape[0])  # a constant (also when the function is traced for export)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), norm.weight, norm.bias, norm.eps)
    x = act2(conv2(act1(x).permute(0, 3, 1, 2)))  # [B, C/8, 4h, 4w]
    return torch.einsum("bchw,bc->bhw", x, hyper)[:, None]
