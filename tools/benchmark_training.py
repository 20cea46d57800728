#!/usr/bin/env python
"""
Training throughput: online (SAM + CLIP run every step) vs from the feature cache
(tools/extract_features.py), side by side in one process, same model, same batches' size.

    python tools/benchmark_training.py --variants BB BL --images 6 --batch 2 --iters 3
    python tools/benchmark_training.py --device cuda --precision bf16 --images 64 --batch 16 --iters 3

Real-size architectures with seeded RANDOM weights (no weight files needed); images from the
generated shapes dataset (SAM resizes every image to 1024 px, so its cost does not depend on the
image). Reports images/s of each mode, the speed-up and the one-off extraction rate.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

import regionspot  # noqa: E402
from regionspot.benchmarking import cpu_model  # noqa: E402
from regionspot.engine import build_train_loader  # noqa: E402
from regionspot.data.shapes import SHAPES_CLASSES, generate_shapes_split  # noqa: E402
from regionspot.solver import build_regionspot_optimizer  # noqa: E402

CONFIGS = {
    "BB": "configs/Base-RegionSpot-BB.yaml",
    "BL": "configs/Base-RegionSpot-BL.yaml",
    "tiny": "configs/Quickstart/RegionSpot-tiny_shapes.yaml",
}
DATASET = "regionspot_benchmark_train"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["BB", "BL"], choices=sorted(CONFIGS))
    p.add_argument("--images", type=int, default=6, help="images in the benchmark dataset")
    p.add_argument("--batch", type=int, default=2, help="images per step (SOLVER.IMS_PER_BATCH)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="MODEL.DEVICE: cpu, cuda or cuda:K")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="MODEL.REGIONSPOT.FROZEN.PRECISION (online training and extraction)")
    p.add_argument("--workdir", default="", help="where the dataset and caches go (default: a temp dir)")
    p.add_argument("--output-json", default="")
    return p.parse_args(argv)


def make_cfg(variant, workdir, batch, device, precision, cache_dir=""):
    cfg = get_cfg()
    regionspot.add_regionspot_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, CONFIGS[variant]))
    rs = cfg.MODEL.REGIONSPOT
    rs.FROZEN.RANDOM_INIT = True
    rs.SAM.WEIGHTS = rs.CLIP.WEIGHTS = ""
    rs.VOCAB.CACHE_DIR = os.path.join(workdir, "text_cache")
    rs.FEATURE_CACHE.DIR = cache_dir
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    rs.FROZEN.PRECISION = precision
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.SEED = 0
    cfg.OUTPUT_DIR = os.path.join(workdir, "output")
    return cfg


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_steps(model, optimizer, loader, warmup, iters, batch, device):
    it = iter(loader)
    model.train()
    for step in range(warmup + iters):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        data = next(it)
        loss = sum(model(data).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def run_variant(variant, args, workdir):
    from regionspot.engine import Trainer
    from regionspot.engine.feature_extraction import main as extract_main

    cache_dir = os.path.join(workdir, f"features_{variant}")
    cfg = make_cfg(variant, workdir, args.batch, args.device, args.precision)
    t0 = time.perf_counter()
    extract_main(["--config-file", os.path.join(REPO_ROOT, CONFIGS[variant]), "--output", cache_dir, "--views",
                  "identity", "--dataset", DATASET, "--no-progress", "--opts"] + _opts(cfg))
    extract_s = time.perf_counter() - t0

    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer = build_regionspot_optimizer(cfg, model)
    online = time_steps(model, optimizer, build_train_loader(cfg), args.warmup, args.iters, args.batch,
                        args.device)
    cached_cfg = make_cfg(variant, workdir, args.batch, args.device, args.precision, cache_dir)
    cached = time_steps(model, optimizer, build_train_loader(cached_cfg), args.warmup, args.iters,
                        args.batch, args.device)
    return {
        "variant": variant,
        "online_images_per_s": online,
        "cached_images_per_s": cached,
        "speedup": cached / online,
        "extraction_images_per_s": args.images / extract_s,
    }


def _opts(cfg):
    rs = cfg.MODEL.REGIONSPOT
    return ["MODEL.REGIONSPOT.FROZEN.RANDOM_INIT", "True", "MODEL.REGIONSPOT.SAM.WEIGHTS", "",
            "MODEL.REGIONSPOT.CLIP.WEIGHTS", "", "MODEL.REGIONSPOT.VOCAB.CACHE_DIR", rs.VOCAB.CACHE_DIR,
            "MODEL.DEVICE", cfg.MODEL.DEVICE, "MODEL.REGIONSPOT.FROZEN.PRECISION", rs.FROZEN.PRECISION,
            "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()"]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="regionspot_train_bench_")
    dicts = generate_shapes_split(os.path.join(workdir, "shapes"), "bench", args.images, seed=0)
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: dicts)
        MetadataCatalog.get(DATASET).set(thing_classes=list(SHAPES_CLASSES), evaluator_type="coco")
    cpu = cpu_model()
    print(f"CPU: {cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device.startswith("cuda"):
        print(f"Device: {torch.cuda.get_device_name(torch.device(args.device))}, CUDA {torch.version.cuda}")
    print(f"{args.images} images, batch {args.batch}, {args.warmup} warm-up + {args.iters} timed steps per mode, "
          f"frozen models in {args.precision} on {args.device}")
    rows = [run_variant(v, args, workdir) for v in args.variants]
    print("| variant | online images/s | cached images/s | speed-up | extraction images/s (one-off) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['online_images_per_s']:.3f} | {r['cached_images_per_s']:.2f} | "
              f"{r['speedup']:.0f}x | {r['extraction_images_per_s']:.3f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
