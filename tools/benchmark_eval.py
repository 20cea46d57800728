#!/usr/bin/env python
"""
Dataset evaluation throughput against the model's own: images/s of detectron2's
``inference_on_dataset(model, loader, evaluator)`` (what ``train_net.py --eval-only`` runs per
dataset) next to images/s of the model's forward alone on already-decoded images, side by side in
one process, same model, same images.

    python tools/benchmark_eval.py                        # BB, 20 photos, 2 torch threads
    python tools/benchmark_eval.py --rounds 2 --modes model before after
    python tools/benchmark_eval.py --modes model before before_w0 before_w1 before_w2 after \\
        after_seq_fast after_stock_masks --output-json output/benchmark_eval.json

The dataset: ``--images`` crops of the photos scikit-image ships (astronaut, coffee, chelsea,
rocket, ...), resized to 640 x 480 or 480 x 640 (COCO / LVIS image sizes), saved as JPEG, with
``--boxes`` random boxes per image of ``--classes`` COCO class names as GT annotations (box polygons
as GT masks), registered with ``register_coco_instances`` (so ``COCOEvaluator``, box and mask AP).
The model: the BB (or BL) architecture with seeded RANDOM weights (no weight files), the authors'
protocol (``INPUT.MIN_SIZE_TEST 800``, 900 top pairs, 300 detections per image), GT boxes as the
prompts, the dataset's class names as the vocabulary (encoded once into ``--workdir``'s text cache).

Modes (each a full pass over the dataset; ``--rounds`` repeats all, in rotated order, and the
ratios are taken within a round, because on a shared machine the speed drifts between passes):

    model             ``model(batch)`` in a loop over the images decoded beforehand (no loader, no
                      evaluator): the ceiling
    before            the evaluation as it was: detectron2's test loader with the config's
                      ``DATALOADER.NUM_WORKERS`` worker processes, detectron2's ``COCOEvaluator.process``
                      after each forward on the main thread
    before_wN         the same with N loader workers
    after             the evaluation as ``evaluate_datasets`` runs it now:
                      ``build_evaluation_loader`` and :class:`OverlappedEvaluator`
    after_wN          the same with ``DATALOADER.NUM_WORKERS`` N
    after_seq_fast    today's loader, ``process`` on the main thread with the once-per-mask encoding
    after_stock_masks today's loader, ``process`` on the background thread with detectron2's encoding

Images/s of an evaluation mode is images / wall time of the whole ``inference_on_dataset`` call
(loader start, loop, waiting for the background thread, ``evaluate()`` with COCOeval and the
results file). The table also splits that time: waiting for the loader, the model, ``process`` on
the main thread, the end (``close`` + ``evaluate``). Every evaluation mode's results (AP dict and
per-image predictions) are compared with those of the first evaluation mode.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset
from detectron2.modeling import build_model

import regionspot  # noqa: F401  (registers the meta-architecture and head)
from regionspot.benchmarking import cpu_model
from regionspot.benchmarking.inputs import REPO_ROOT
from regionspot.config import get_regionspot_cfg
from regionspot.data.mappers import build_regionspot_test_mapper, evaluation_loader_workers
from regionspot.evaluation import evaluator as evaluator_module
from regionspot.data.multi_dataset import dataset_class_names
from regionspot.evaluation.evaluator import OverlappedEvaluator, build_evaluation_loader, process_outputs

CONFIGS = {"BB": "configs/Base-RegionSpot-BB.yaml", "BL": "configs/Base-RegionSpot-BL.yaml"}
DATASET = "regionspot_benchmark_eval"
# COCO class names: 30 classes x 12 boxes = 360 (region, class) pairs, so the 300 kept detections
# per image are what LVIS evaluation has (DETECTIONS_PER_IMAGE 300).
CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "stereo_motorcycle", "retina"]


# ---------------------------------------------------------------------------------------------
# Machine
def cpu_pressure() -> float:
    """Linux PSI "some" avg10 of the CPU (% of time runnable tasks waited for a CPU), or nan."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def cpu_times():
    """(busy, steal, total) jiffies of all CPUs from /proc/stat, or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + v[4]
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:8]) - idle - steal, steal, sum(v[:8])


# ---------------------------------------------------------------------------------------------
# Data
def _photo(name):
    from skimage import data

    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return np.ascontiguousarray(image[..., :3])


def make_dataset(root: str, num_images: int, boxes_per_image: int, num_classes: int, seed: int) -> str:
    """
    Write the photo dataset (JPEGs + a COCO json) under ``root`` and return the json's path.

    Deterministic in its arguments; an existing json made with the same arguments is reused.
    """
    from PIL import Image

    json_file = os.path.join(root, f"instances_n{num_images}_b{boxes_per_image}_c{num_classes}_s{seed}.json")
    if os.path.isfile(json_file):
        return json_file
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in PHOTOS]
    images, annotations = [], []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        height, width = (480, 640) if i % 3 else (640, 480)
        # A random crop of the target aspect ratio, resized to the target size.
        s = min(h / height, w / width) * rng.uniform(0.6, 1.0)
        ch, cw = int(height * s), int(width * s)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(np.ascontiguousarray(photo[y0 : y0 + ch, x0 : x0 + cw])).resize((width, height), Image.BILINEAR)
        file_name = f"s{seed}_{i:05d}.jpg"
        image.save(os.path.join(root, file_name), quality=90)
        images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
        for _ in range(boxes_per_image):
            bw, bh = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
            x, y = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
            box = [round(float(v), 2) for v in (x, y, bw, bh)]
            x, y, bw, bh = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, num_classes + 1)),
                "bbox": box, "area": bw * bh, "iscrowd": 0,
                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            })
    categories = [{"id": j + 1, "name": CLASSES[j]} for j in range(num_classes)]
    tmp = json_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(tmp, json_file)
    return json_file


def register(json_file: str, image_root: str) -> None:
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    register_coco_instances(DATASET, {}, json_file, image_root)


def make_cfg(args, workdir: str):
    opts = [
        "MODEL.DEVICE", args.device,
        "MODEL.WEIGHTS", "",
        "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT", True,
        "MODEL.REGIONSPOT.SAM.WEIGHTS", "",
        "MODEL.REGIONSPOT.CLIP.WEIGHTS", "",
        "MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM", True,
        "MODEL.REGIONSPOT.VOCAB.SOURCE", "dataset",
        "MODEL.REGIONSPOT.VOCAB.CACHE_DIR", os.path.join(workdir, "text_cache"),
        "INPUT.MIN_SIZE_TEST", args.min_size_test,
        "DATASETS.TRAIN", (),
        "DATASETS.TEST", (DATASET,),
        "OUTPUT_DIR", os.path.join(workdir, "output"),
    ]
    return get_regionspot_cfg(os.path.join(REPO_ROOT, CONFIGS[args.variant]), opts + list(args.opts))


def with_workers(cfg, workers):
    if workers is None:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = int(workers)
    cfg.freeze()
    return cfg


class BoxMasks(torch.nn.Module):
    """
    The model, with each detection's mask replaced by its filled box (``--masks boxes``).

    The random SAM decoder's masks are salt and pepper (about half the pixels, ~60,000-character
    RLEs at 640 x 480), where real SAM masks are a few solid blobs (RLEs of a few hundred to a few
    thousand characters). The RLE's length drives the cost of COCO's evaluate() (mask areas, boxes and
    IoUs from the RLEs) and of the results files, not the model's: this stand-in gives masks of a
    real object's complexity, after the model computed its own (so the model's cost is unchanged).
    Detections of one region keep sharing a mask, as they do in RegionSpot.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        outputs = self.model(batched_inputs)
        for output in outputs:
            instances = output.get("instances")
            if instances is None or not instances.has("pred_masks"):
                continue
            h, w = instances.image_size
            boxes, index = torch.unique(instances.pred_boxes.tensor, dim=0, return_inverse=True)
            masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[i, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
            instances.pred_masks = masks[index]
        return outputs


# ---------------------------------------------------------------------------------------------
# Timed wrappers (time spent on the main thread only)
class TimedLoader:
    """An iterable of batches that adds the time its ``next`` takes to ``stats["data_s"]``."""

    def __init__(self, loader, stats):
        self.loader, self.stats = loader, stats

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.stats["data_s"] += time.perf_counter() - t
            yield batch


class TimedEvaluator(DatasetEvaluator):
    """Times ``process`` and the end (``close`` of an overlapped evaluator, then ``evaluate``)."""

    def __init__(self, evaluator, stats, process=None):
        self.evaluator, self.stats, self._process = evaluator, stats, process

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        t, c = time.perf_counter(), time.thread_time()
        if self._process is not None:
            self._process(inputs, outputs)
        else:
            self.evaluator.process(inputs, outputs)
        self.stats["process_s"] += time.perf_counter() - t
        self.stats["process_cpu_s"] += time.thread_time() - c

    def evaluate(self):
        t = time.perf_counter()
        self.stats["loop_end"] = t
        if isinstance(self.evaluator, OverlappedEvaluator):
            self.evaluator.close()
            self.stats["join_s"] = time.perf_counter() - t
        results = self.evaluator.evaluate()
        self.stats["end_s"] = time.perf_counter() - t
        return results


# ---------------------------------------------------------------------------------------------
# Modes
def mode_spec(name: str, cfg):
    """(loader kind, NUM_WORKERS or None for the config's, evaluator kind) of an evaluation mode."""
    if name == "before":
        return "stock", None, "sequential"
    if name.startswith("before_w"):
        return "stock", int(name[len("before_w"):]), "sequential"
    if name == "after":
        return "current", None, "overlapped"
    if name.startswith("after_w"):
        return "current", int(name[len("after_w"):]), "overlapped"
    if name == "after_seq_fast":
        return "current", None, "sequential_fast"
    if name == "after_stock_masks":
        return "current", None, "overlapped_stock_masks"
    raise ValueError(f"unknown mode {name!r}")


def run_model_only(model, batches):
    times0, psi0 = cpu_times(), cpu_pressure()
    t = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    stats = {"wall_s": time.perf_counter() - t, "psi_start": psi0, "psi_end": cpu_pressure()}
    times1 = cpu_times()
    if times0 and times1:
        stats["machine_busy"] = (times1[0] - times0[0]) / max(times1[2] - times0[2], 1)
    return stats


def run_evaluation(model, cfg, name, out_dir):
    """One ``inference_on_dataset`` pass of evaluation mode ``name``; returns timings and results."""
    loader_kind, workers, evaluator_kind = mode_spec(name, cfg)
    one = with_workers(cfg, workers)
    stats = {"data_s": 0.0, "process_s": 0.0, "process_cpu_s": 0.0, "background_cpu_s": 0.0, "join_s": 0.0, "end_s": 0.0}
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    base = COCOEvaluator(DATASET, output_dir=out_dir)
    if loader_kind == "stock":
        # What build_regionspot_test_loader returned before: detectron2's test loader with workers.
        loader = build_detection_test_loader(one, DATASET, mapper=build_regionspot_test_mapper(one))
    else:
        loader = build_evaluation_loader(one, DATASET)
    process = None
    if evaluator_kind == "sequential":
        evaluator = base
    elif evaluator_kind == "sequential_fast":
        evaluator = base
        process = lambda inputs, outputs: process_outputs(base, inputs, outputs)  # noqa: E731
    elif evaluator_kind == "overlapped":
        evaluator = OverlappedEvaluator(base)
    else:
        evaluator = OverlappedEvaluator(base, fast_masks=False)
    timed = TimedEvaluator(evaluator, stats, process)
    # The CPU time of the background thread's work: OverlappedEvaluator calls the module's
    # process_outputs on that thread.
    original = evaluator_module.process_outputs

    def background_process(*a, **k):
        c = time.thread_time()
        try:
            return original(*a, **k)
        finally:
            stats["background_cpu_s"] += time.thread_time() - c

    evaluator_module.process_outputs = background_process
    cpu0, times0, psi0 = time.process_time(), cpu_times(), cpu_pressure()
    t0 = time.perf_counter()
    try:
        results = inference_on_dataset(model, TimedLoader(loader, stats), timed)
    finally:
        evaluator_module.process_outputs = original
        if isinstance(evaluator, OverlappedEvaluator):
            evaluator.close()
    wall = time.perf_counter() - t0
    stats.update(
        wall_s=wall,
        loop_s=stats["loop_end"] - t0,
        cpu_s=time.process_time() - cpu0,
        psi_start=psi0,
        psi_end=cpu_pressure(),
        workers=one.DATALOADER.NUM_WORKERS if loader_kind == "stock" else evaluation_loader_workers(one.DATALOADER.NUM_WORKERS),
        evaluator=evaluator_kind,
        loader=loader_kind,
    )
    stats["model_s"] = stats["loop_s"] - stats["data_s"] - stats["process_s"]
    times1 = cpu_times()
    if times0 and times1:
        total = max(times1[2] - times0[2], 1)
        stats["machine_busy"] = (times1[0] - times0[0]) / total
        stats["steal"] = (times1[1] - times0[1]) / total
    with open(os.path.join(out_dir, "coco_instances_results.json"), encoding="utf-8") as f:
        predictions = json.load(f)
    # Compared as json text: NaN (AP of a class without GT) equals itself there.
    return stats, json.dumps(results, sort_keys=True), json.dumps(predictions)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="BB", choices=sorted(CONFIGS))
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--boxes", type=int, default=12, help="GT boxes (prompts) per image")
    p.add_argument("--classes", type=int, default=30, help="vocabulary size (<= 30)")
    p.add_argument("--min-size-test", type=int, default=800, help="INPUT.MIN_SIZE_TEST (800: the authors' protocol)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=["model", "before", "after"],
                   help="model, before, before_wN, after, after_wN, after_seq_fast, after_stock_masks")
    p.add_argument("--rounds", type=int, default=1, help="passes of every mode, in rotated order")
    p.add_argument("--masks", default="model", choices=["model", "boxes"],
                   help="evaluate the model's masks (random SAM: salt and pepper) or each detection's filled "
                        "box in their place (the complexity of real masks; see BoxMasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(REPO_ROOT, "output", "benchmark_eval"),
                   help="dataset, text-embedding cache and evaluator outputs")
    p.add_argument("--output-json", default="")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)
    if not 1 <= args.classes <= len(CLASSES):
        p.error(f"--classes must be in 1..{len(CLASSES)}")
    if "model" not in args.modes:
        p.error("--modes must include 'model' (the ratios are taken against it)")
    return args


def _table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = os.path.abspath(args.workdir)
    image_root = os.path.join(workdir, "data")
    json_file = make_dataset(image_root, args.images, args.boxes, args.classes, args.seed)
    register(json_file, image_root)
    cfg = make_cfg(args, workdir)
    eval_modes = [m for m in args.modes if m != "model"]
    for m in eval_modes:
        mode_spec(m, cfg)  # unknown names fail now, not after the build

    t = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.eval()
    model.roi_heads.set_vocabulary(dataset_class_names(DATASET))
    build_s = time.perf_counter() - t
    if args.masks == "boxes":
        model = BoxMasks(model).eval()

    # The model-only inputs: every image read and mapped as the loader does, before any timing.
    mapper = build_regionspot_test_mapper(cfg)
    batches = [[mapper(d)] for d in DatasetCatalog.get(DATASET)]
    with torch.no_grad():
        detections = [len(model(batches[0])[0]["instances"])]  # warm-up (first-call allocations)

    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "variant": args.variant,
        "images": len(batches),
        "image_sizes": sorted({tuple(b[0]["image"].shape[1:]) for b in batches}),
        "boxes_per_image": args.boxes,
        "classes": args.classes,
        "detections_first_image": detections[0],
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "mask_on": cfg.MODEL.REGIONSPOT.MASK.ENABLED,
        "masks": args.masks,
        "config_num_workers": cfg.DATALOADER.NUM_WORKERS,
        "build_s": round(build_s, 1),
        "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else [],
    }
    print(json.dumps(info), flush=True)

    passes = []
    reference = None
    identical = {}
    for r in range(args.rounds):
        order = args.modes[r % len(args.modes):] + args.modes[: r % len(args.modes)]
        for name in order:
            if name == "model":
                stats = run_model_only(model, batches)
            else:
                stats, results, predictions = run_evaluation(model, cfg, name, os.path.join(workdir, "output", name))
                if reference is None:
                    reference = (name, results, predictions)
                else:
                    same = results == reference[1] and predictions == reference[2]
                    identical[name] = identical.get(name, True) and same
            stats.update(mode=name, round=r, images_per_s=len(batches) / stats["wall_s"])
            passes.append(stats)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}), flush=True)

    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"info": info, "passes": passes, "identical": identical}, f, indent=1)

    # Ratio of each evaluation pass to the model-only pass(es) of the same round.
    model_ips = {
        r: float(np.mean([p["images_per_s"] for p in passes if p["mode"] == "model" and p["round"] == r]))
        for r in range(args.rounds)
    }
    rows = []
    for name in dict.fromkeys(args.modes):
        ps = [p for p in passes if p["mode"] == name]
        ips = float(np.median([p["images_per_s"] for p in ps]))
        ratios = [p["images_per_s"] / model_ips[p["round"]] for p in ps]
        med = lambda key: float(np.median([p.get(key, float("nan")) for p in ps])) / len(batches)  # noqa: E731
        rows.append([
            name,
            "-" if name == "model" else str(ps[0]["workers"]),
            "-" if name == "model" else ps[0]["evaluator"],
            f"{ips:.4f}",
            " / ".join(f"{x:.3f}" for x in ratios),
            "-" if name == "model" else f"{med('data_s') * 1000:.0f}",
            "-" if name == "model" else f"{med('model_s'):.2f}",
            "-" if name == "model" else f"{med('process_s') * 1000:.0f}",
            "-" if name == "model" else f"{(med('process_cpu_s') + med('background_cpu_s')) * 1000:.0f}",
            "-" if name == "model" else f"{med('end_s') * len(batches):.2f}",
            "-" if name == "model" else f"{float(np.median([p['model_s'] / p['wall_s'] for p in ps])):.3f}",
            f"{float(np.median(ratios)):.3f}",
            "-" if name == "model" else ("yes (reference)" if name == reference[0] else ("yes" if identical.get(name) else "NO")),
            " / ".join(f"{p.get('psi_start', float('nan')):.0f}-{p.get('psi_end', float('nan')):.0f}" for p in ps),
        ])
    headers = ["mode", "loader workers", "process()", "images/s", "ratio to model (per round)", "wait loader ms/img",
               "model s/img", "process main-thread ms/img", "process CPU ms/img", "end s (join+evaluate)",
               "model share of wall", "ratio to model (median)",
               "results identical",
               "CPU pressure % (start-end)"]
    print()
    print(f"CPU: {info['cpu_model']} ({info['cpu_count']} logical CPUs), torch {info['torch']}, "
          f"{info['torch_threads']} torch threads, {args.variant}, {info['images']} images {info['image_sizes']} "
          f"(after resize), {args.boxes} boxes, {args.classes} classes, {detections[0]} detections/image, "
          f"MIN_SIZE_TEST {info['min_size_test']}, config NUM_WORKERS {info['config_num_workers']}, "
          f"masks: {'off' if not info['mask_on'] else args.masks}")
    print(_table(rows, headers))
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
