#!/usr/bin/env python
"""
ONNX Runtime against the torch predictor on this CPU, side by side in one run: latency per phase,
peak memory, file sizes, and dynamic int8 quantisation of the prompt decoder and the head (its
logit difference and top-1 agreement with fp32)::

    python tools/benchmark_onnx.py --config-file configs/Base-RegionSpot-BB.yaml \\
        MODEL.REGIONSPOT.FROZEN.RANDOM_INIT True MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM True \\
        --num-regions 10 100 --output output/benchmark_onnx.json

Each path runs in its own process (so its peak resident memory is its own): the torch
``RegionSpotPredictor``, ``OnnxRegionSpotPredictor`` on the fp32 graphs, and on the graphs with an
int8 decoder and head. Phases: ``set_vocabulary`` (C classes x 81 prompts through the text tower),
``set_image`` (SAM's encoder + CLIP), ``predict`` for N boxes with masks at the image's size, and
without masks. The figures are medians over ``--repeats``.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

VOCABULARY = ["person", "car", "dog", "cat", "chair", "table", "bottle", "cup", "bird", "horse",
              "bicycle", "boat", "tree", "building", "sky", "road", "grass", "window", "door", "lamp"]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(_REPO_ROOT, "configs", "Base-RegionSpot-BB.yaml"))
    p.add_argument("--export-dir", default=None, help="existing export to use (default: export into a temp dir)")
    p.add_argument("--num-regions", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--no-quantize", action="store_true", help="skip the int8 decoder + head")
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return p


def _image(h, w):
    import numpy as np

    try:
        from PIL import Image
        from skimage import data

        return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BILINEAR))
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _boxes(n, h, w):
    import numpy as np

    rng = np.random.default_rng(n)
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
    wh = rng.uniform(16, [w * 0.5, h * 0.5], (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)


def _timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _hide_torch():
    """The ONNX workers run as on a machine without torch: its import (and its memory) is refused."""
    import importlib.abc

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "detectron2", "clip", "segment_anything"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Hide())


def _worker(args):
    if args.worker != "torch":
        _hide_torch()
    import numpy as np

    h, w = args.image_size
    image = np.load(os.path.join(os.path.dirname(args.result), "image.npy"))
    result = {"phases_s": {}}
    t0 = time.perf_counter()
    if args.worker == "torch":
        import torch

        from regionspot import RegionSpotPredictor
        from regionspot.config import get_regionspot_cfg

        cfg = get_regionspot_cfg(args.config_file, args.opts)
        cfg.MODEL.DEVICE = "cpu"
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
        cfg.MODEL.REGIONSPOT.VOCAB.CACHE_DIR = tempfile.mkdtemp()  # no cached text embeddings
        torch.manual_seed(0)  # the same random stand-in head as tools/export_onnx.py
        predictor = RegionSpotPredictor(cfg)
        to_np = lambda out: {k: v.numpy() for k, v in out.items()}  # noqa: E731
        result["threads"] = torch.get_num_threads()
    else:
        from regionspot.export import OnnxRegionSpotPredictor

        graphs = {"sam_decoder": "sam_decoder.int8.onnx", "head": "head.int8.onnx"} if args.worker == "int8" else None
        predictor = OnnxRegionSpotPredictor(args.export_dir, graphs=graphs)
        to_np = lambda out: out  # noqa: E731
    result["load_s"] = time.perf_counter() - t0
    result["phases_s"]["set_vocabulary"], _ = _timed(lambda: predictor.set_vocabulary(VOCABULARY), 1)
    predictor.set_image(image)  # warm-up
    result["phases_s"]["set_image"], _ = _timed(lambda: predictor.set_image(image), args.repeats)
    logits = {}
    for n in args.num_regions:
        boxes = _boxes(n, h, w)
        predictor.predict(boxes)  # warm-up
        result["phases_s"][f"predict_N{n}"], out = _timed(lambda: to_np(predictor.predict(boxes)), args.repeats)
        result["phases_s"][f"predict_N{n}_no_masks"], _ = _timed(
            lambda: predictor.predict(boxes, return_masks=False), args.repeats)
        logits[f"N{n}"] = out["logits"]
    np.savez(args.result, **logits)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with open(args.result + ".json", "w") as f:
        json.dump(result, f)


def _run_worker(kind, args, export_dir, workdir):
    result = os.path.join(workdir, kind + ".npz")
    cmd = [sys.executable, os.path.abspath(__file__), *args.opts, "--worker", kind, "--result", result, "--export-dir", export_dir,
           "--config-file", args.config_file, "--repeats", str(args.repeats),
           "--image-size", *map(str, args.image_size), "--num-regions", *map(str, args.num_regions)]
    subprocess.run(cmd, check=True, cwd=_REPO_ROOT)
    import numpy as np

    with open(result + ".json") as f:
        out = json.load(f)
    return out, dict(np.load(result))


def main(argv=None):
    args = get_parser().parse_intermixed_args(argv)
    if args.worker:
        return _worker(args)
    import numpy as np

    from regionspot.benchmarking.machine import cpu_model, load_average

    workdir = tempfile.mkdtemp(prefix="rs_onnx_bench_")
    report = {"cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg_start": load_average(), "config": args.config_file,
              "opts": args.opts, "image_size": args.image_size, "num_regions": args.num_regions}
    export_dir = args.export_dir
    if export_dir is None:
        export_dir = os.path.join(workdir, "export")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(_REPO_ROOT, "tools", "export_onnx.py"), "--config-file",
                        args.config_file, "--output", export_dir, *args.opts], check=True, cwd=_REPO_ROOT)
        report["export_s"] = time.perf_counter() - t0
    with open(os.path.join(export_dir, "manifest.json")) as f:
        manifest = json.load(f)
    report["file_mib"] = {k: os.path.getsize(os.path.join(export_dir, v)) / 2**20 for k, v in manifest["graphs"].items()}
    kinds = ["torch", "onnx_fp32"]
    if not args.no_quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for name in ("sam_decoder", "head"):
            src = os.path.join(export_dir, manifest["graphs"][name])
            dst = os.path.join(export_dir, f"{name}.int8.onnx")
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
            report["file_mib"][f"{name}.int8"] = os.path.getsize(dst) / 2**20
        kinds.append("int8")
    np.save(os.path.join(workdir, "image.npy"), _image(*args.image_size))
    runs, logits = {}, {}
    for kind in kinds:
        runs[kind], logits[kind] = _run_worker(kind, args, export_dir, workdir)
    report["runs"] = runs
    report["agreement"] = {}
    for kind in kinds[1:]:
        for key, ref in logits["torch"].items():
            other = logits[kind][key]
            report["agreement"][f"{kind}_vs_torch_{key}"] = {
                "max_abs_logit_diff": float(np.abs(other - ref).max()),
                "top1_agreement": float((other.argmax(-1) == ref.argmax(-1)).mean()),
            }
    report["loadavg_end"] = load_average()
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
