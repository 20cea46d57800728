#!/usr/bin/env python
"""
SAM automatic-mask proposals (``BOX_SOURCE GENERATOR``, ``SamAutomaticProposals``): seconds per image
with SAM's image encoder run once per image (the generator hands its image states to the head) against
the former route, where the head encoded every image a second time. Both routes run side by side in one
process, on the same model and the same photos, and their outputs are compared.

    python tools/benchmark_generator.py                      # RegionSpot-BB, astronaut + coffee, 2 threads
    python tools/benchmark_generator.py --images coffee --points-per-side 4 --repeats 2 --output-json out.json

Real-size architecture with seeded RANDOM weights (no weight file is read): SAM ViT-B and CLIP ViT-B/16
of ``configs/Base-RegionSpot-BB.yaml`` with ``MODEL.REGIONSPOT.FROZEN.RANDOM_INIT``, a random fusion
module and a small custom vocabulary. Random SAM weights predict poor masks, so the automatic mask
generator's quality filters are off (thresholds 0) for it to return proposals. Images are resized as
detectron2's ``DefaultPredictor`` does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``).

Routes, timed around the whole call (proposals, recognition, post-processing):

    one_encoding    ``model.inference(batched_inputs)``: the generator encodes the image with the
                    head's SAM and the head decodes its prompts on those states.
    two_encodings   the generator's ``forward`` (proposals only), then the head called without
                    ``sam_states``, so SAM encodes the image again; post-processed as ``inference``.

Reported: seconds per image of each route (median over ``--repeats``), the ratio two / one, SAM image
encoder calls per image and the encoder's own time, proposals per image, whether the outputs (boxes,
scores, classes, masks) are identical, the CPU (``lscpu``'s Model name), threads and versions.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model

import regionspot
from regionspot.benchmarking import cpu_model
from regionspot.benchmarking.inputs import REPO_ROOT
from regionspot.modeling.meta_arch import rescale_results

CONFIG = os.path.join(REPO_ROOT, "configs", "Base-RegionSpot-BB.yaml")
VOCABULARY = ("person", "rocket", "flag", "cup", "coffee", "spoon", "plate", "table")
PHOTOS = ("astronaut", "coffee")


def build_cfg(args, cache_dir: str):
    cfg = get_cfg()
    regionspot.add_regionspot_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list([
        "MODEL.DEVICE", args.device,
        "MODEL.WEIGHTS", "",
        "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT", True,
        "MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", True,
        "MODEL.REGIONSPOT.SAM.WEIGHTS", "",
        "MODEL.REGIONSPOT.CLIP.WEIGHTS", "",
        "MODEL.REGIONSPOT.VOCAB.SOURCE", "custom",
        "MODEL.REGIONSPOT.VOCAB.CUSTOM", list(args.vocabulary),
        "MODEL.REGIONSPOT.VOCAB.CACHE_DIR", cache_dir,
        "MODEL.REGIONSPOT.BOX_SOURCE", "GENERATOR",
        "MODEL.PROPOSAL_GENERATOR.NAME", "SamAutomaticProposals",
        "MODEL.REGIONSPOT.AMG.POINTS_PER_SIDE", args.points_per_side,
        # Random SAM weights: with SAM's default filters (0.88 / 0.95) hardly any mask would survive.
        "MODEL.REGIONSPOT.AMG.PRED_IOU_THRESH", 0.0,
        "MODEL.REGIONSPOT.AMG.STABILITY_SCORE_THRESH", 0.0,
    ])
    cfg.freeze()
    return cfg


def load_inputs(cfg, names):
    """DefaultPredictor's input: the photo resized by ResizeShortestEdge, original height/width kept."""
    from skimage import data

    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    inputs = []
    for name in names:
        image = getattr(data, name)()
        resized = resize.get_transform(image).apply_image(image) if cfg.INPUT.MIN_SIZE_TEST > 0 else image
        inputs.append({
            "name": name,
            "size": list(image.shape[:2]),
            "input": {
                "image": torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous(),  # a writable copy
                "height": image.shape[0],
                "width": image.shape[1],
            },
        })
    return inputs


def one_encoding(model, batched_inputs):
    """The route of ``model.inference``; its proposals are not exposed (None)."""
    return model.inference(batched_inputs), None


def two_encodings(model, batched_inputs):
    """The former route: the generator encodes the images, then the head encodes them again."""
    images = model.preprocess_image(batched_inputs)
    proposals, _ = model.proposal_generator(images, {}, None)
    results, _ = model.roi_heads(images, {}, proposals, None)  # no sam_states: SAM encodes again
    outputs = [
        {"instances": rescale_results(r, x["height"], x["width"], drop_empty=True)}
        for r, x in zip(results, batched_inputs)
    ]
    return outputs, proposals


ROUTES = {"one_encoding": one_encoding, "two_encodings": two_encodings}


@contextlib.contextmanager
def encoder_timer(model):
    """Count SAM image-encoder calls and time them (synchronised on CUDA)."""
    encoder = model.roi_heads.sam.sam.image_encoder
    forward = encoder.forward
    record = {"calls": 0, "images": 0, "seconds": 0.0}

    def timed(x, *a, **k):
        sync(x.device)
        start = time.perf_counter()
        out = forward(x, *a, **k)
        sync(x.device)
        record["seconds"] += time.perf_counter() - start
        record["calls"] += 1
        record["images"] += x.shape[0]
        return out

    encoder.forward = timed
    try:
        yield record
    finally:
        del encoder.forward


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(model, route: str, batched_inputs, device):
    with torch.no_grad(), encoder_timer(model) as encoder:
        sync(device)
        start = time.perf_counter()
        outputs, proposals = ROUTES[route](model, batched_inputs)
        sync(device)
        seconds = time.perf_counter() - start
    return outputs, proposals, seconds, encoder


def compare(outputs, reference) -> dict:
    """Whether two routes' detections are identical, and the largest score difference."""
    identical, max_score_diff = True, 0.0
    for out, ref in zip(outputs, reference):
        a, b = out["instances"].to("cpu"), ref["instances"].to("cpu")
        if len(a) != len(b):
            return {"identical": False, "max_abs_score_diff": None, "note": f"{len(a)} vs {len(b)} detections"}
        for field in ("pred_boxes", "scores", "pred_classes", "pred_masks", "mask_scores"):
            x, y = a.get(field), b.get(field)
            x, y = getattr(x, "tensor", x), getattr(y, "tensor", y)
            identical &= bool(torch.equal(x, y))
        if len(a):
            max_score_diff = max(max_score_diff, float((a.scores - b.scores).abs().max()))
    return {"identical": identical, "max_abs_score_diff": max_score_diff}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=CONFIG, help="the architecture (random weights)")
    parser.add_argument("--images", nargs="+", default=list(PHOTOS), choices=PHOTOS, help="scikit-image photos")
    parser.add_argument("--points-per-side", type=int, default=8, help="AMG grid (8: 64 point prompts)")
    parser.add_argument("--vocabulary", nargs="+", default=list(VOCABULARY))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each route on each image")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs (one-encoding route, first image)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="", help="text-embedding cache (default: a temporary folder)")
    parser.add_argument("--output-json", default="")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Other processes on the machine slow both routes; the load average says how busy it was.
    load_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_cfg(args, args.cache_dir or tmp)
        torch.manual_seed(args.seed)  # the random fusion module
        build_start = time.perf_counter()
        model = build_model(cfg).eval()
        build_seconds = time.perf_counter() - build_start
    inputs = load_inputs(cfg, args.images)

    for _ in range(args.warmup):
        run_timed(model, "one_encoding", [inputs[0]["input"]], args.device)

    per_image = []
    for i, item in enumerate(inputs):
        # Alternate which route runs first, so that neither always runs on a warmer machine.
        order = list(ROUTES) if i % 2 == 0 else list(ROUTES)[::-1]
        times = {route: [] for route in ROUTES}
        encoder, outputs, proposals = {}, {}, None
        for _ in range(args.repeats):
            for route in order:
                outputs[route], props, seconds, enc = run_timed(model, route, [item["input"]], args.device)
                proposals = props if props is not None else proposals
                times[route].append(seconds)
                encoder[route] = enc
        row = {
            "image": item["name"],
            "size_hw": item["size"],
            "input_size_hw": list(item["input"]["image"].shape[-2:]),
            "proposals": len(proposals[0]),
            "detections": len(outputs["one_encoding"][0]["instances"]),
            "seconds": {route: statistics.median(t) for route, t in times.items()},
            "all_seconds": times,
            "sam_encoder_calls": {route: encoder[route]["images"] for route in ROUTES},
            "sam_encoder_seconds": {route: round(encoder[route]["seconds"], 3) for route in ROUTES},
            "ratio": statistics.median(times["two_encodings"]) / statistics.median(times["one_encoding"]),
            "outputs": compare(outputs["one_encoding"], outputs["two_encodings"]),
        }
        per_image.append(row)
        print(
            f"{row['image']:>10} {row['size_hw']} -> {row['input_size_hw']}: {row['proposals']} proposals | "
            f"two encodings {row['seconds']['two_encodings']:.2f} s | "
            f"one encoding {row['seconds']['one_encoding']:.2f} s "
            f"| x{row['ratio']:.2f} | SAM encoder calls {row['sam_encoder_calls']['two_encodings']} -> "
            f"{row['sam_encoder_calls']['one_encoding']} | outputs identical: {row['outputs']['identical']}",
            flush=True,
        )

    mean = {route: statistics.mean(r["seconds"][route] for r in per_image) for route in ROUTES}
    report = {
        "command": " ".join(["python", os.path.relpath(__file__, REPO_ROOT)] + list(sys.argv[1:] if argv is None else argv)),
        "cpu_model_name": cpu_model(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device)),
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start_end": [[round(x, 2) for x in load_at_start], [round(x, 2) for x in os.getloadavg()]],
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "config": os.path.relpath(os.path.abspath(args.config_file), REPO_ROOT),
        "sam_type": cfg.MODEL.REGIONSPOT.SAM.TYPE,
        "clip_type": cfg.MODEL.REGIONSPOT.CLIP.TYPE,
        "points_per_side": args.points_per_side,
        "vocabulary_size": len(args.vocabulary),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "build_seconds": round(build_seconds, 2),
        "per_image": per_image,
        "mean_seconds_per_image": mean,
        "ratio_of_means": mean["two_encodings"] / mean["one_encoding"],
        "all_outputs_identical": all(r["outputs"]["identical"] for r in per_image),
    }
    print(
        f"mean s/image: two encodings {mean['two_encodings']:.2f}, one encoding {mean['one_encoding']:.2f}, "
        f"x{report['ratio_of_means']:.2f} ({report['cpu_model_name']}, {report['torch_num_threads']} threads, "
        f"SAM {report['sam_type']}, CLIP {report['clip_type']}, AMG {args.points_per_side}x{args.points_per_side})"
    )
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
