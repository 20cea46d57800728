"""
The reference pipeline, written with the stock ``segment_anything`` package, and its agreement with
ours.

:class:`ReferencePipeline` is what one writes with the stock packages: ``SamPredictor`` for the
image, the stock prompt encoder and mask decoder on all N boxes in one call,
``Sam.postprocess_masks`` + threshold for all N boxes, then CLIP's dense features and the fusion
module, logits and softmax of our head (the same objects as ours). :func:`agreement` compares the
outputs of one round of the reference and of our three pipelines.
"""
import contextlib

from .keys import (
    CLIP,
    FUSION_HEAD,
    MASK_DECODER,
    MASK_POSTPROCESS,
    OURS_CLS_ONLY,
    OURS_EVAL_MASKS,
    OURS_PREDICTOR_MASKS,
    REFERENCE,
    SAM_ENCODER,
)
from .timing import PhaseRecorder, classify


@contextlib.contextmanager
def fp32(frozen_module):
    """Run a frozen module in fp32 whatever its FROZEN_PRECISION (the reference is the fp32 baseline)."""
    saved = frozen_module.precision
    frozen_module.precision = "fp32"
    try:
        yield
    finally:
        frozen_module.precision = saved


def build_reference_sam(head, sam_type: str, seed: int):
    """
    A stock SAM (stock encoder attention) with the seeded random weights of ``head.sam``, on its
    device; raises if its weights are not exactly ours.
    """
    import torch

    from regionspot.modeling.sam_tokens import build_sam

    ref_sam = build_sam(sam_type, "", True, seed).to(head.sam.device)
    ours_sd, ref_sd = head.sam.sam.state_dict(), ref_sam.state_dict()
    same = ours_sd.keys() == ref_sd.keys() and all(torch.equal(ours_sd[k], ref_sd[k]) for k in ours_sd)
    if not same:
        raise RuntimeError("The reference SAM's weights differ from ours: the seeds do not match.")
    return ref_sam


class ReferencePipeline:
    """
    The straightforward pipeline with the stock packages: ``segment_anything.SamPredictor`` for the
    image, the stock prompt encoder and mask decoder on all N boxes at once, ``Sam.postprocess_masks``
    + threshold for all N, then CLIP dense features, the fusion module, logits and softmax of ``head``.

    The region token is read by a forward hook on ``mask_decoder.transformer`` (``hs[:, 1]``, the
    single-mask token after the final attention and norm), as segment_anything does not return it.
    CLIP always runs in fp32 here, whatever our FROZEN_PRECISION.

    Calling it with an [H, W, 3] uint8 RGB image and [N, 4] XYXY boxes (numpy) returns
    ``{"logits": [N, C], "probs": [N, C], "masks": [N, H, W] bool}``.
    """

    def __init__(self, sam, head, recorder: PhaseRecorder = None):
        from segment_anything import SamPredictor
        from segment_anything.modeling.image_encoder import Attention

        for m in sam.image_encoder.modules():
            if isinstance(m, Attention) and "forward" in vars(m):
                raise ValueError("The reference SAM must use the stock encoder attention (build it without FAST_PATH).")
        self.sam = sam
        self.predictor = SamPredictor(sam)
        self.head = head
        self.recorder = recorder if recorder is not None else PhaseRecorder()
        self._token = None
        sam.mask_decoder.transformer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, outputs):
        self._token = outputs[0][:, 1, :]

    def __call__(self, image, boxes_np) -> dict:
        import numpy as np
        import torch

        rec, sam, head, predictor = self.recorder, self.sam, self.head, self.predictor
        n = len(boxes_np)
        with rec.phase(SAM_ENCODER):
            predictor.set_image(image)  # ResizeLongestSide + preprocess + stock image encoder
        with rec.phase(CLIP), fp32(head.clip):
            feats = head.clip.dense_features(head.clip.image_to_tensor(image))
        with rec.phase(MASK_DECODER):
            if n:
                box = predictor.transform.apply_boxes(np.asarray(boxes_np, dtype=np.float64), predictor.original_size)
                box = torch.as_tensor(box, dtype=torch.float, device=predictor.device)
                sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=predictor.features,
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                tokens, self._token = self._token, None
            else:  # the stock decoder cannot take 0 prompts
                tokens = predictor.features.new_zeros((0, sam.mask_decoder.transformer_dim))
        with rec.phase(MASK_POSTPROCESS):
            if n:
                masks = sam.postprocess_masks(low_res, predictor.input_size, predictor.original_size)
                masks = masks[:, 0] > sam.mask_threshold
            else:
                masks = torch.zeros((0, *predictor.original_size), dtype=torch.bool, device=predictor.device)
        with rec.phase(FUSION_HEAD):
            region_embeddings = head.region_embeddings(tokens[None], feats)[0]
            logits = classify(head, region_embeddings)
            probs = logits.softmax(dim=-1)
        return {"logits": logits, "probs": probs, "masks": masks}


# ---------------------------------------------------------------------------------------------
# Agreement
def max_abs_diff(a, b) -> float:
    """max |a - b| (NaN if either is None, 0 for empty tensors)."""
    if a is None or b is None:
        return float("nan")
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max().item())


def pixel_disagreement(a, b):
    """(fraction of differing pixels, number of differing pixels) of two bool mask stacks."""
    if a.numel() == 0:
        return 0.0, 0
    diff = int((a != b).sum().item())
    return diff / a.numel(), diff


def top1_agreement(a, b) -> float:
    """Fraction of regions whose highest-scoring class is the same in two [N, C] logit tensors."""
    if a is None or b is None:
        return float("nan")
    if a.shape[0] == 0:
        return 1.0
    return float((a.argmax(dim=-1) == b.argmax(dim=-1)).float().mean().item())


def agreement(outputs: dict, num_boxes: int, tol: float, precision: str = "fp32") -> dict:
    """
    Reference (fp32) vs ours on the outputs of one round (mode -> outputs). The logits tolerance is
    checked in fp32 only; with reduced-precision frozen models (fp16/bf16) the differences are
    reported, and ``logits_within_tolerance`` is None.
    """
    ref = outputs[REFERENCE]
    ref_logits = ref["logits"]
    ev, pr, cl = outputs[OURS_EVAL_MASKS], outputs[OURS_PREDICTOR_MASKS], outputs[OURS_CLS_ONLY]
    diffs = {
        OURS_EVAL_MASKS: max_abs_diff(ev["logits"], ref_logits),
        OURS_PREDICTOR_MASKS: max_abs_diff(pr["logits"], ref_logits),
        OURS_CLS_ONLY: max_abs_diff(cl["logits"], ref_logits),
    }
    worst = max(diffs.values())
    out = {
        "precision": precision,
        "logits_max_abs_diff": diffs,
        "logits_max_abs_diff_max": worst,
        "logits_tolerance": tol,
        # False for NaN too; None (not checked) in reduced precision.
        "logits_within_tolerance": bool(worst < tol) if precision == "fp32" else None,
        "top1_class_agreement_cls_only": top1_agreement(cl["logits"], ref_logits),
        "logits_abs_max_reference": float(ref_logits.abs().max().item()) if num_boxes else 0.0,
        "probs_max_abs_diff_cls_only": max_abs_diff(cl["scores"], ref["probs"]),
    }
    frac, count = pixel_disagreement(pr["masks"], ref["masks"])
    out["mask_pixels_differing_fraction"] = {OURS_PREDICTOR_MASKS: frac}
    out["mask_pixels_differing"] = {OURS_PREDICTOR_MASKS: count}
    out["mask_pixels_compared"] = {OURS_PREDICTOR_MASKS: int(ref["masks"].numel())}
    inst = ev["instances"]
    out["eval_num_detections"] = len(inst)
    if "masks" in ev:
        idx = ev["region_index"]
        out["eval_num_mask_regions"] = int(idx.unique().numel()) if len(idx) else 0
        frac, count = pixel_disagreement(ev["masks"], ref["masks"][idx])
        out["mask_pixels_differing_fraction"][OURS_EVAL_MASKS] = frac
        out["mask_pixels_differing"][OURS_EVAL_MASKS] = count
        out["mask_pixels_compared"][OURS_EVAL_MASKS] = int(ev["masks"].numel())
        if len(inst):
            ref_scores = ref["probs"][idx, inst.pred_classes]
            out["eval_scores_max_abs_diff"] = max_abs_diff(inst.scores, ref_scores)
        else:
            out["eval_scores_max_abs_diff"] = 0.0
    return out
