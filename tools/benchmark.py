#!/usr/bin/env python
"""
Per-image latency and peak memory of RegionSpot at real size, with RANDOM weights.

No weight file is read: SAM and CLIP are built with seeded random weights
(``MODEL.REGIONSPOT.RANDOM_INIT_FROZEN True``), which have the architecture (and therefore the
cost) of the released models but recognise nothing. The fusion module is randomly initialised too.

Every (variant, number of boxes) measurement runs in a fresh Python subprocess, so its peak memory
is its own. The model is built once per subprocess; the build is timed separately and kept out of
the phase timings. Phases, on the same image and boxes:

    sam_encoder       head.sam.encode_image(image)
    clip              head.clip.dense_features(head.clip.image_to_tensor(image))
    prompt_decoding   head.sam.decode_prompts(state, boxes, with_masks=True)
    fusion_head       region_embeddings + logits + softmax
    mask_postprocess  head.sam.postprocess_masks(low_res_masks, state)
    total             RegionSpotPredictor.set_image(image) + predict(boxes)  (the predictor path)
    eval_path_total   head.recognize(image, Instances(proposal_boxes=boxes))  (the evaluation path)

Examples::

    # the full sweep (CPU); a persistent --cache-dir keeps the vocabulary's text embeddings
    # between runs (they are encoded once per CLIP variant, inside the build time, otherwise)
    python tools/benchmark.py --variants BB BL --num-boxes 1 10 100 --repeats 3 --warmup 1 \\
        --cache-dir output/benchmark_text_cache --output-json output/benchmark_cpu.json --markdown
    # quick smoke run with the tiny models
    python tools/benchmark.py --variants tiny --num-boxes 0 1 3 --repeats 1 --warmup 0

Memory: on CPU the peak resident set size (RSS) of the subprocess. After the build the kernel's
RSS high-water mark is reset (``/proc/self/clear_refs``), so ``peak_rss_mb`` is the peak while
measuring and ``peak_rss_growth_mb`` = ``peak_rss_mb - rss_after_build_mb``; where the reset is not
possible the peak is the whole process's (``peak_rss_reset: false``) and may be the build's. On
CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the end of the build.
"""
import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

logger = logging.getLogger("regionspot.benchmark")

VARIANT_CONFIGS = {
    "BB": "configs/Base-RegionSpot-BB.yaml",
    "BL": "configs/Base-RegionSpot-BL.yaml",
    "BL336": "configs/Base-RegionSpot-BL336.yaml",
    "tiny": "configs/RegionSpot-tiny_shapes.yaml",
}
PHASES = (
    "sam_encoder",
    "clip",
    "prompt_decoding",
    "fusion_head",
    "mask_postprocess",
    "total",
    "eval_path_total",
)
# Components of the predictor path; their sum is reported next to "total".
COMPONENT_PHASES = PHASES[:5]
DEFAULT_VOCABULARY = (
    "person", "cup", "coffee", "spoon", "plate", "table", "dog", "car", "chair", "bottle",
)
RANDOM_IMAGE_HW = (512, 600)


# ---------------------------------------------------------------------------------------------
# Machine description
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": cpu_model(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    try:
        import detectron2

        info["detectron2_version"] = detectron2.__version__
    except ImportError:
        info["detectron2_version"] = None
    return info


# ---------------------------------------------------------------------------------------------
# Inputs
def load_image(spec: str, seed: int):
    """
    Args:
        spec: "coffee" or "astronaut" (scikit-image's sample photos), "random", or an image path.
        seed: seed of the random image.

    Returns:
        ([H, W, 3] uint8 RGB array, description string).
    """
    import numpy as np

    if spec in ("coffee", "astronaut"):
        try:
            import skimage.data
        except ImportError:
            logger.warning("scikit-image is not installed; using a seeded random image instead of %r.", spec)
        else:
            return np.ascontiguousarray(getattr(skimage.data, spec)()), f"skimage.data.{spec}()"
        spec = "random"
    if spec == "random":
        rng = np.random.default_rng(seed)
        h, w = RANDOM_IMAGE_HW
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), f"random {w}x{h} (seed {seed})"
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--image {spec!r}: not 'coffee', 'astronaut', 'random' or an existing file.")
    from PIL import Image

    with Image.open(spec) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8)), spec


def random_boxes(num: int, height: int, width: int, seed: int, min_size: float = 8.0):
    """[num, 4] float32 XYXY boxes inside a (height, width) image, at least min_size on each side."""
    import numpy as np

    rng = np.random.default_rng(seed)
    min_w, min_h = min(min_size, width), min(min_size, height)
    x1 = rng.uniform(0, width - min_w, size=num)
    y1 = rng.uniform(0, height - min_h, size=num)
    # x1 <= width - min_w, so every box fits: min_w <= box width <= width - x1.
    x2 = np.minimum(x1 + rng.uniform(min_w, width - x1), width)
    y2 = np.minimum(y1 + rng.uniform(min_h, height - y1), height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(num, 4)


# ---------------------------------------------------------------------------------------------
# Worker: one (variant, N) measurement in this process
def build_cfg(variant: str, device: str, cache_dir: str, vocabulary):
    from detectron2.config import get_cfg

    from regionspot import add_regionspot_config

    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(os.path.join(_REPO_ROOT, VARIANT_CONFIGS[variant]))
    cfg.merge_from_list([
        "MODEL.DEVICE", device,
        "MODEL.WEIGHTS", "",
        "MODEL.REGIONSPOT.RANDOM_INIT_FROZEN", True,
        "MODEL.REGIONSPOT.SAM.WEIGHTS", "",
        "MODEL.REGIONSPOT.CLIP.WEIGHTS", "",
        "MODEL.REGIONSPOT.VOCABULARY", "custom",
        "MODEL.REGIONSPOT.CUSTOM_VOCABULARY", list(vocabulary),
        "MODEL.REGIONSPOT.TEXT_CACHE_DIR", cache_dir,
    ])
    cfg.freeze()
    return cfg


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_worker(spec: dict) -> dict:
    import numpy as np
    import torch
    from detectron2.structures import Boxes, Instances

    from regionspot import RegionSpotPredictor
    from regionspot.modeling.text_embeddings import TextEmbeddingCache

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    is_cuda = device.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False.")

    def sync():
        if is_cuda:
            torch.cuda.synchronize(torch.device(device))

    image, image_desc = load_image(spec["image"], spec["seed"])
    height, width = image.shape[:2]
    boxes_np = random_boxes(spec["num_boxes"], height, width, spec["seed"])
    cfg = build_cfg(spec["variant"], device, spec["cache_dir"], spec["vocabulary"])

    cache_before = set(os.listdir(spec["cache_dir"])) if os.path.isdir(spec["cache_dir"]) else set()
    # The build includes the vocabulary's text embeddings (read from the cache, or encoded by
    # CLIP's text tower when not cached); that part is timed on its own as "vocabulary_s".
    vocabulary_s = [0.0]
    original_get = TextEmbeddingCache.get

    def timed_get(self, *a, **kw):
        start = time.perf_counter()
        try:
            return original_get(self, *a, **kw)
        finally:
            vocabulary_s[0] += time.perf_counter() - start

    TextEmbeddingCache.get = timed_get
    torch.manual_seed(spec["seed"])
    sync()
    t0 = time.perf_counter()
    try:
        predictor = RegionSpotPredictor(cfg)
        sync()
    finally:
        TextEmbeddingCache.get = original_get
    build_s = time.perf_counter() - t0
    cache_after = set(os.listdir(spec["cache_dir"])) if os.path.isdir(spec["cache_dir"]) else set()
    head = predictor.head
    predictor.model.eval()

    boxes = torch.as_tensor(boxes_np)
    regions = Instances((height, width))
    regions.proposal_boxes = Boxes(boxes.to(device))

    result = {
        "variant": spec["variant"],
        "config": VARIANT_CONFIGS[spec["variant"]],
        "sam_type": cfg.MODEL.REGIONSPOT.SAM.TYPE,
        "clip_type": cfg.MODEL.REGIONSPOT.CLIP.TYPE,
        "clip_input_size": cfg.MODEL.REGIONSPOT.CLIP.INPUT_SIZE,
        "num_boxes": spec["num_boxes"],
        "num_classes": head.num_classes,
        "device": device,
        "image": image_desc,
        "image_hw": [height, width],
        "repeats": spec["repeats"],
        "warmup": spec["warmup"],
        "torch_num_threads": torch.get_num_threads(),
        "build_s": build_s,
        "vocabulary_s": vocabulary_s[0],
        "text_embeddings_encoded_in_build": bool(cache_after - cache_before),
        "rss_after_build_mb": _current_rss_mb(),
        "build_peak_rss_mb": _maxrss_mb(),
    }
    if is_cuda:
        result["device_name"] = torch.cuda.get_device_name(torch.device(device))
        result["gpu_mem_after_build_mb"] = torch.cuda.memory_allocated(torch.device(device)) / 2**20
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    result["peak_rss_reset"] = _reset_peak_rss()

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - start

    def one_round():
        times = {}
        state, times["sam_encoder"] = timed(lambda: head.sam.encode_image(image))
        feats, times["clip"] = timed(lambda: head.clip.dense_features(head.clip.image_to_tensor(image)))
        out, times["prompt_decoding"] = timed(
            lambda: head.sam.decode_prompts(state, boxes, with_masks=True, chunk_size=head.prompt_chunk_size)
        )
        probs, times["fusion_head"] = timed(
            lambda: head.logits(head.region_embeddings(out.tokens[None], feats)[0]).softmax(dim=-1)
        )
        masks, times["mask_postprocess"] = timed(lambda: head.sam.postprocess_masks(out.low_res_masks, state))
        assert probs.shape == (len(boxes), head.num_classes), probs.shape
        assert masks.shape == (len(boxes), height, width), masks.shape

        def predictor_path():
            predictor.set_image(image)
            return predictor.predict(boxes)

        pred, times["total"] = timed(predictor_path)
        assert pred["scores"].shape == (len(boxes), head.num_classes)
        inst, times["eval_path_total"] = timed(lambda: head.recognize(image, regions))
        assert len(inst) <= len(boxes) * head.num_classes
        return times

    runs = {p: [] for p in PHASES}
    with torch.inference_mode():
        for i in range(spec["warmup"]):
            t = one_round()
            logger.info("%s N=%d: warm-up %d/%d done (total %.1f ms)", spec["variant"], spec["num_boxes"],
                        i + 1, spec["warmup"], t["total"] * 1000.0)
        for i in range(spec["repeats"]):
            t = one_round()
            for phase, seconds in t.items():
                runs[phase].append(seconds * 1000.0)
            logger.info("%s N=%d: run %d/%d done (total %.1f ms)", spec["variant"], spec["num_boxes"],
                        i + 1, spec["repeats"], t["total"] * 1000.0)

    result["phases_ms"] = {p: statistics.median(v) for p, v in runs.items()}
    result["phases_ms_runs"] = runs
    result["components_sum_ms"] = sum(result["phases_ms"][p] for p in COMPONENT_PHASES)
    result["peak_rss_mb"] = _maxrss_mb()
    result["peak_rss_growth_mb"] = result["peak_rss_mb"] - result["rss_after_build_mb"]
    if is_cuda:
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
        result["gpu_peak_growth_mb"] = result["gpu_peak_mb"] - result["gpu_mem_after_build_mb"]
    return result


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per (variant, N), then the report
def run_job(spec: dict, timeout=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="regionspot_bench_") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        out_path = os.path.join(tmp, "result.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", spec_path, "--_worker-out", out_path]
        # The worker's stdout goes to our stderr: our stdout carries only the report.
        try:
            proc = subprocess.run(cmd, cwd=_REPO_ROOT, stdout=sys.stderr, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"variant": spec["variant"], "num_boxes": spec["num_boxes"], "error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not os.path.isfile(out_path):
            return {
                "variant": spec["variant"],
                "num_boxes": spec["num_boxes"],
                "error": f"worker exited with code {proc.returncode} (see its log above)",
            }
        with open(out_path, encoding="utf-8") as f:
            return json.load(f)


def _fmt(x, digits=1):
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def results_table(results, markdown: bool) -> str:
    from tabulate import tabulate

    headers = ["variant", "N", "build s", "of which vocab s"] + [f"{p} ms" for p in PHASES]
    headers += ["mem after build MB", "peak MB", "peak growth MB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], r["num_boxes"], "ERROR: " + r["error"]] + [""] * (len(headers) - 3))
            continue
        if r["device"].startswith("cuda"):
            mem = [r["gpu_mem_after_build_mb"], r["gpu_peak_mb"], r["gpu_peak_growth_mb"]]
        else:
            mem = [r["rss_after_build_mb"], r["peak_rss_mb"], r["peak_rss_growth_mb"]]
        rows.append(
            [r["variant"], r["num_boxes"], _fmt(r["build_s"], 2), _fmt(r["vocabulary_s"], 2)]
            + [_fmt(r["phases_ms"][p]) for p in PHASES]
            + [_fmt(m, 0) for m in mem]
        )
    return tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True)


def machine_text(info: dict, args, image_desc: str, markdown: bool) -> str:
    mem_kind = "GPU memory (torch.cuda.max_memory_allocated)" if args.device.startswith("cuda") else "process RSS"
    lines = [
        ("CPU", f"{info['cpu_model']} ({info['cpu_count']} logical CPUs, "
                f"torch threads {info['torch_num_threads']})"),
        ("Device", f"{args.device}: {info['device_name']}"),
        ("Software", f"torch {info['torch_version']}, detectron2 {info['detectron2_version']}, "
                     f"Python {info['python_version']}"),
        ("Load average at start", ", ".join(str(x) for x in info.get("load_average_at_start", [])) or "n/a"),
        ("Image", image_desc),
        ("Protocol", f"random weights; {args.warmup} warm-up + median of {args.repeats} run(s); "
                     f"{len(args.vocabulary)} classes; memory = {mem_kind}"),
    ]
    if markdown:
        return "\n".join(f"- **{k}**: {v}" for k, v in lines)
    return "\n".join(f"{k + ':':<24}{v}" for k, v in lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Latency and peak memory of RegionSpot with random weights (no weight files needed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--variants", nargs="+", default=["BB", "BL"], choices=sorted(VARIANT_CONFIGS),
                   help="model variants (BB/BL/BL336: real-size architectures; tiny: smoke test)")
    p.add_argument("--num-boxes", nargs="+", type=int, default=[1, 10, 100], help="box prompts per image")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    p.add_argument("--image", default="coffee",
                   help="'coffee' or 'astronaut' (scikit-image sample photos, used at their size), "
                        "'random' (seeded 600x512), or an image file")
    p.add_argument("--seed", type=int, default=0, help="seed of the boxes (and of a random image)")
    p.add_argument("--vocabulary", nargs="+", default=list(DEFAULT_VOCABULARY), help="class names")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in workers (0: torch default). On a machine shared with "
                        "other jobs, fewer threads than cores avoids OpenMP contention that can inflate "
                        "timings many times over")
    p.add_argument("--cache-dir", default="",
                   help="text-embedding cache directory (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per (variant, N) subprocess")
    p.add_argument("--output-json", default="", help="write machine info and all results to this file")
    p.add_argument("--markdown", action="store_true", help="print the report as markdown (for docs/BENCHMARKS.md)")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--_worker-out", dest="_worker_out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return args
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if any(n < 0 for n in args.num_boxes):
        p.error("--num-boxes must be >= 0")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error("--device must be cpu, cuda or cuda:K")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s %(name)s] %(message)s")

    if args._worker:
        with open(args._worker, encoding="utf-8") as f:
            spec = json.load(f)
        result = run_worker(spec)
        with open(args._worker_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    info = machine_info(args.device)
    _, image_desc = load_image(args.image, args.seed)
    jobs = [(v, n) for v in args.variants for n in args.num_boxes]
    results = []
    with tempfile.TemporaryDirectory(prefix="regionspot_text_cache_") as default_cache:
        cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else default_cache
        for i, (variant, num) in enumerate(jobs, 1):
            logger.info("[%d/%d] variant=%s N=%d device=%s", i, len(jobs), variant, num, args.device)
            spec = {
                "variant": variant,
                "num_boxes": num,
                "device": args.device,
                "image": args.image,
                "seed": args.seed,
                "vocabulary": list(args.vocabulary),
                "repeats": args.repeats,
                "warmup": args.warmup,
                "threads": args.threads,
                "cache_dir": cache_dir,
            }
            t0 = time.perf_counter()
            r = run_job(spec, args.timeout)
            if "error" in r:
                logger.error("variant=%s N=%d failed: %s", variant, num, r["error"])
            else:
                logger.info(
                    "variant=%s N=%d: total %.1f ms, eval path %.1f ms (job %.1f s)",
                    variant, num, r["phases_ms"]["total"], r["phases_ms"]["eval_path_total"],
                    time.perf_counter() - t0,
                )
            results.append(r)

    worker_threads = sorted({r["torch_num_threads"] for r in results if "torch_num_threads" in r})
    if worker_threads:
        info["torch_num_threads"] = worker_threads[0] if len(worker_threads) == 1 else worker_threads
    print(machine_text(info, args, image_desc, args.markdown))
    print()
    print(results_table(results, args.markdown))
    if args.output_json:
        out_dir = os.path.dirname(os.path.abspath(args.output_json))
        os.makedirs(out_dir, exist_ok=True)
        payload = {
            "machine": info,
            "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "image": image_desc,
            "phases": list(PHASES),
            "results": results,
        }
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        logger.info("Wrote %s", args.output_json)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
