#!/usr/bin/env python
"""
Localizer / vision-language-model pairs side by side on the CPU, the released pair (SAM ViT-B + OpenAI
CLIP ViT-B/16) as reference: latency split into localizer encoder, prompt decoding, VLM dense map and
head (fusion + scoring) at N prompts, peak memory (max RSS after each pair) and parameter counts. Real
sizes with seeded random weights (FROZEN.RANDOM_INIT): latency does not depend on the weights.

    python tools/benchmark_models.py                    # the default pairs, N = 10 and 100
    python tools/benchmark_models.py --tiny --repeats 1  # tiny presets (a smoke run)
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
from detectron2.config import get_cfg

import regionspot
from regionspot.benchmarking.machine import cpu_model
from regionspot.modeling import RegionSpotROIHeads

# (label, localizer NAME, TYPE, VLM NAME, TYPE); the released pair first.
PAIRS = [
    ("SAM-B + CLIP-B/16 (released)", "SamRegionTokens", "vit_b", "ClipDenseFeatures", "ViT-B/16"),
    ("SAM 2.1 B+ + CLIP-B/16", "Sam2RegionTokens", "sam2.1_hiera_b+", "ClipDenseFeatures", "ViT-B/16"),
    ("SAM 2.1 T + CLIP-B/16", "Sam2RegionTokens", "sam2.1_hiera_t", "ClipDenseFeatures", "ViT-B/16"),
    ("HQ-SAM B + CLIP-B/16", "HQSamRegionTokens", "vit_b", "ClipDenseFeatures", "ViT-B/16"),
    ("light HQ-SAM + CLIP-B/16", "HQSamRegionTokens", "vit_tiny", "ClipDenseFeatures", "ViT-B/16"),
    ("SAM-B + EVA02-CLIP-B/16", "SamRegionTokens", "vit_b", "OpenClipDenseFeatures", "EVA02-B-16"),
    ("SAM-B + MetaCLIP B/16", "SamRegionTokens", "vit_b", "OpenClipDenseFeatures", "ViT-B-16-quickgelu"),
]
TINY = {"vit_b": "tiny", "vit_tiny": "tiny", "sam2.1_hiera_b+": "tiny", "sam2.1_hiera_t": "tiny", "ViT-B/16": "tiny",
        "EVA02-B-16": "RegionSpot-tiny-EVA02", "ViT-B-16-quickgelu": "RegionSpot-tiny-OpenCLIP"}


def make_cfg(loc, loc_type, vlm, vlm_type, tiny):
    cfg = get_cfg()
    regionspot.add_regionspot_config(cfg)
    rs = cfg.MODEL.REGIONSPOT
    cfg.MODEL.DEVICE = "cpu"
    rs.FROZEN.RANDOM_INIT = True
    rs.HEAD.ALLOW_RANDOM = True
    rs.LOCALIZER.NAME, rs.VLM.NAME = loc, vlm
    if tiny:
        loc_type, vlm_type = TINY[loc_type], TINY[vlm_type]
        rs.CLIP.INPUT_SIZE = 0 if "EVA02" in vlm_type else 64
    if loc == "SamRegionTokens":
        rs.SAM.TYPE = loc_type
    else:
        rs.LOCALIZER.TYPE = loc_type
    if vlm == "ClipDenseFeatures":
        rs.CLIP.TYPE = vlm_type
    else:
        rs.VLM.TYPE = vlm_type
    rs.VOCAB.SOURCE = "custom"
    rs.VOCAB.CUSTOM = ["cat", "dog", "person", "car"]
    return cfg


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best * 1000


def bench_pair(cfg, image, ns, repeats):
    head = RegionSpotROIHeads(cfg, None).eval()
    params = {
        "localizer": sum(p.numel() for p in head.sam.parameters()),
        "vlm": sum(p.numel() for p in head.clip.parameters()),
        "fusion": sum(p.numel() for p in head.fusion.parameters()),
    }
    rows = []
    with torch.no_grad():
        state, enc_ms = timed(lambda: head.sam.encode_image(image), repeats)
        feats, vlm_ms = timed(lambda: head.clip.dense_features(head.clip.image_to_tensor(image)), repeats)
        rng = np.random.RandomState(0)
        h, w = image.shape[:2]
        for n in ns:
            xy = rng.rand(n, 2) * [w * 0.6, h * 0.6]
            boxes = torch.as_tensor(np.concatenate([xy, xy + rng.rand(n, 2) * [w * 0.4, h * 0.4] + 4], 1), dtype=torch.float32)
            out, dec_ms = timed(lambda: head.sam.decode_prompts(state, boxes, with_masks=False, chunk_size=32), repeats)
            _, head_ms = timed(
                lambda: head.classifier.class_scores(head.classifier(head.region_embeddings(out.tokens[None], feats)[0])),
                repeats,
            )
            rows.append((n, enc_ms, dec_ms, vlm_ms, head_ms))
    return rows, params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny presets instead of real sizes (smoke run)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per measurement")
    p.add_argument("--ns", type=int, nargs="+", default=[10, 100])
    p.add_argument("--pairs", type=int, nargs="*", help="indices into the pair list (default: all)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    image = (np.random.RandomState(0).rand(480, 640, 3) * 255).astype(np.uint8)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, load average {' '.join(load)} (before); torch {torch.__version__}")
    print("| pair | N | localizer encoder ms | prompt decoding ms | VLM ms | head ms | total ms | params localizer / VLM / fusion (M) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    chosen = [PAIRS[i] for i in args.pairs] if args.pairs else PAIRS
    for label, loc, loc_type, vlm, vlm_type in chosen:
        rows, params = bench_pair(make_cfg(loc, loc_type, vlm, vlm_type, args.tiny), image, args.ns, args.repeats)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # cumulative peak of the process
        pm = " / ".join(f"{params[k] / 1e6:.1f}" for k in ("localizer", "vlm", "fusion"))
        for n, enc, dec, vlm_ms, head_ms in rows:
            total = enc + dec + vlm_ms + head_ms
            print(f"| {label} | {n} | {enc:.0f} | {dec:.0f} | {vlm_ms:.0f} | {head_ms:.1f} | {total:.0f} | {pm} | {rss:.2f} |")
        sys.stdout.flush()
    with open("/proc/loadavg") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
