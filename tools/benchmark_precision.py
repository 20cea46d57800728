#!/usr/bin/env python
"""
fp32 vs bf16 frozen models on this machine: speed of the evaluation path at N boxes, agreement of
the outputs, and how close the SAM encoder gets to the machine's matrix throughput.

For each variant (BB, BL) two models are built from the same seeds (SAM and CLIP with seeded
random weights of the released architectures, a seeded random fusion module; no weight file):
``MODEL.REGIONSPOT.FROZEN.PRECISION fp32`` (the reference for parity) and ``bf16``. Then, alternating
which goes first in each round (so a shared machine's load falls on both), the evaluation path
``head.recognize(image, regions)`` runs on the same image and N boxes with the kept detections' masks
materialised at image size (what evaluation produces), timed per phase inside the real calls:

    sam_encoder    SAM preprocessing + image encoder
    mask_decoder   prompt encoder + mask decoder (tokens, and masks for every prompt)
    clip           CLIP image tensor + dense features
    total          the whole call, masks included

Agreement of bf16 with fp32 (last round): max |logit difference| over all regions and classes, top-1
class agreement of the regions, kept-detection overlap (|A & B| / |A | B| of the (region, class) pairs
each keeps, TEST.DETECTIONS_PER_IMAGE of them), and the fraction of mask pixels that differ for the
(region, class) detections both keep.

Matrix throughput: a plain [M, K] x [K, N] matmul in fp32 and bf16 (GFLOP/s), against the SAM image
encoder's achieved GFLOP/s (its FLOPs counted once with ``torch.utils.flop_counter``). ``--profile``
also prints the operations that take the most time in one bf16 encoder and decoder call.

Example (the command of docs/BENCHMARKS.md)::

    python tools/benchmark_precision.py --variants BB BL --num-boxes 100 --classes 100 --repeats 3 --profile
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from regionspot.benchmarking.inputs import build_cfg, load_image, lvis_vocabulary, random_boxes  # noqa: E402
from regionspot.benchmarking.machine import cpu_model, load_average, matrix_features  # noqa: E402

logger = logging.getLogger("regionspot.benchmark_precision")

PHASES = ("sam_encoder", "mask_decoder", "clip", "total")


def _timed(recorder, phase, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        recorder[phase] = recorder.get(phase, 0.0) + time.perf_counter() - t
        return out

    return wrapper


def build(variant: str, precision: str, cache_dir: str, vocabulary, seed: int):
    cfg = build_cfg(variant, "cpu", cache_dir, vocabulary, precision=precision)
    torch.manual_seed(seed)  # the same random fusion module for both precisions
    return build_model(cfg).eval()


def run_once(model, image, regions, recorder):
    head = model.roi_heads
    head.sam.encode_image = _timed(recorder, "sam_encoder", type(head.sam).encode_image.__get__(head.sam))
    head.sam.decode_prompts = _timed(recorder, "mask_decoder", type(head.sam).decode_prompts.__get__(head.sam))
    head.clip.dense_features = _timed(recorder, "clip", type(head.clip).dense_features.__get__(head.clip))
    logits = []
    forward = type(head.classifier).forward.__get__(head.classifier)
    head.classifier.forward = lambda *a, **k: logits.append(forward(*a, **k)) or logits[-1]
    try:
        t = time.perf_counter()
        with torch.no_grad():
            out = head.recognize(image, regions)
            masks = out.pred_masks.to_bitmasks(None, *out.image_size).tensor if out.has("pred_masks") else None
        recorder["total"] = time.perf_counter() - t
    finally:
        for name in ("encode_image", "decode_prompts"):
            del head.sam.__dict__[name]
        del head.clip.__dict__["dense_features"]
        del head.classifier.__dict__["forward"]
    return {"logits": logits[0], "instances": out, "masks": masks}


def agreement(ref, low, boxes_n):
    a, b = ref["logits"], low["logits"]
    out = {
        "logits_max_abs_diff": float((a - b).abs().max()),
        "logits_max_abs": float(a.abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }
    ra, rb = ref["instances"], low["instances"]
    boxes_a = ra.pred_boxes.tensor
    # Detections are (region, class) pairs; the region is recovered from its box (boxes are the prompts).
    def pairs(inst):
        keys = {}
        for i, (box, c) in enumerate(zip(inst.pred_boxes.tensor.tolist(), inst.pred_classes.tolist())):
            keys[(tuple(round(v, 3) for v in box), c)] = i
        return keys

    pa, pb = pairs(ra), pairs(rb)
    common = set(pa) & set(pb)
    out["kept_detection_overlap"] = len(common) / max(len(set(pa) | set(pb)), 1)
    out["kept_detections"] = [len(pa), len(pb)]
    if ref["masks"] is not None and common:
        ia = torch.tensor([pa[k] for k in common])
        ib = torch.tensor([pb[k] for k in common])
        out["mask_px_differing"] = float((ref["masks"][ia] != low["masks"][ib]).float().mean())
    del boxes_a, boxes_n
    return out


def matmul_gflops(dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / min(times) / 1e9


def encoder_flops(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    encoder = model.roi_heads.sam.sam.image_encoder
    size = encoder.img_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(x)
    return float(counter.get_total_flops())


def profile_bf16(model, image, regions, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    head = model.roi_heads
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        state = head.sam.encode_image(image)
        head.sam.decode_prompts(state, regions.proposal_boxes.tensor, with_masks=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["BB", "BL"], choices=["BB", "BL", "BL336", "tiny"])
    parser.add_argument("--num-boxes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--classes", type=int, default=100,
                        help="vocabulary: the first K LVIS names (0: all 1203; their text embeddings are encoded once "
                             "per variant into --cache-dir, which takes long at real size)")
    parser.add_argument("--image", default="coffee")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(_REPO_ROOT, "output", "benchmark_text_cache"))
    parser.add_argument("--profile", action="store_true", help="print the top operations of one bf16 call")
    parser.add_argument("--output-json", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    features = matrix_features()
    report = {
        "cpu_model": cpu_model(),
        "cpu_matrix_features": {k: v for k, v in features.items() if v},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "classes": args.classes,
        "load_average_start": load_average(),
        "matmul_gflops": {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)},
        "variants": {},
    }
    image, image_desc = load_image(args.image, args.seed)
    h, w = image.shape[:2]
    boxes = torch.as_tensor(random_boxes(args.num_boxes, h, w, args.seed), dtype=torch.float32)
    regions = Instances((h, w))
    regions.proposal_boxes = Boxes(boxes)
    vocabulary = lvis_vocabulary()
    vocabulary = vocabulary[: args.classes] if args.classes > 0 else vocabulary
    for variant in args.variants:
        models = {p: build(variant, p, args.cache_dir, vocabulary, args.seed) for p in ("fp32", "bf16")}
        runs = {p: [] for p in models}
        outputs = {}
        for r in range(args.warmup + args.repeats):
            order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
            for p in order:
                recorder = {}
                outputs[p] = run_once(models[p], image, regions, recorder)
                if r >= args.warmup:
                    runs[p].append(recorder)
                logger.info(f"{variant} {p} round {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in recorder.items()))
        med = {p: {k: statistics.median(x[k] for x in runs[p]) for k in PHASES} for p in runs}
        flops = encoder_flops(models["fp32"])
        entry = {
            "num_boxes": args.num_boxes,
            "image": image_desc,
            "median_s": med,
            "speedup": {k: med["fp32"][k] / med["bf16"][k] for k in PHASES},
            "agreement_bf16_vs_fp32": agreement(outputs["fp32"], outputs["bf16"], args.num_boxes),
            "sam_encoder_gflop": flops / 1e9,
            "sam_encoder_gflops_achieved": {p: flops / 1e9 / med[p]["sam_encoder"] for p in med},
        }
        if args.profile:
            entry["bf16_profile"] = profile_bf16(models["bf16"], image, regions)
        report["variants"][variant] = entry
        del models
    report["load_average_end"] = load_average()

    print(f"CPU: {report['cpu_model']} (matrix units: {', '.join(report['cpu_matrix_features']) or 'none'}), "
          f"torch {report['torch']}, {report['threads']} threads, load {report['load_average_start']} -> "
          f"{report['load_average_end']}")
    mm = report["matmul_gflops"]
    print(f"plain 2048^3 matmul: fp32 {mm['fp32']:.0f} GFLOP/s, bf16 {mm['bf16']:.0f} GFLOP/s")
    print("| variant | precision | " + " | ".join(f"{p} s" for p in PHASES) + " | SAM encoder GFLOP/s (of matmul) |")
    print("|---|---|" + "---|" * (len(PHASES) + 1))
    for variant, e in report["variants"].items():
        for p in ("fp32", "bf16"):
            got = e["sam_encoder_gflops_achieved"][p]
            print(f"| {variant} | {p} | " + " | ".join(f"{e['median_s'][p][k]:.2f}" for k in PHASES)
                  + f" | {got:.0f} ({got / mm[p]:.0%}) |")
        print(f"| {variant} | speed-up | " + " | ".join(f"{e['speedup'][k]:.2f}x" for k in PHASES) + " | |")
    for variant, e in report["variants"].items():
        print(f"{variant} agreement (bf16 vs fp32): {json.dumps(e['agreement_bf16_vs_fp32'])}")
        if "bf16_profile" in e:
            print(f"{variant} bf16 profile (one encoder + decoder call):\n{e['bf16_profile']}")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
