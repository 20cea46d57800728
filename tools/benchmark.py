#!/usr/bin/env python
"""
Latency, peak memory and numerical agreement of RegionSpot against a straightforward reference
pipeline written with the stock packages, at real size, with RANDOM weights.

No weight file is read: SAM and CLIP are built with seeded random weights
(``MODEL.REGIONSPOT.RANDOM_INIT_FROZEN True``), which have the architecture (and therefore the
cost) of the released models but recognise nothing. The fusion module is randomly initialised too
(``torch.manual_seed(--seed)`` before the build).

Pipelines compared, in one subprocess per (variant, N), on the same image, the same N boxes and the
same weights (the reference SAM is built by ``build_sam`` from the config's seed, and checked to
equal ours parameter by parameter; CLIP, the fusion module and the vocabulary are the same objects):

    reference             ``segment_anything.SamPredictor`` on a stock SAM (stock encoder attention),
                          a forward hook on ``mask_decoder.transformer`` reading the region token
                          ``hs[:, 1]``; the stock mask decoder on ALL N boxes in one call
                          (``multimask_output=False``); ``Sam.postprocess_masks`` + threshold for all
                          N boxes (a full-resolution mask for every region); CLIP dense features, the
                          fusion module, logits and softmax of our head.
    ours_eval_masks       the evaluation path: ``head.recognize(image, regions)`` (top-k pairs +
                          ``TEST.DETECTIONS_PER_IMAGE``) and the kept detections' masks materialised
                          at image size with ``pred_masks.to_bitmasks(None, H, W).tensor``.
    ours_predictor_masks  ``RegionSpotPredictor.set_image(image)`` + ``predict(boxes)``: masks for
                          every region.
    ours_cls_only         ``set_image(image)`` + ``predict(boxes, return_masks=False)``.

Phases (median over ``--repeats`` timed rounds; each round runs all four, in that order):

    sam_encoder       SAM preprocessing + image encoder
    clip              CLIP image tensor + dense features
    mask_decoder      prompt encoder + mask decoder (two-way transformer, and, with masks, the
                      up-scaling and hypernetwork); ours: ``head.sam.decode_prompts``
    mask_postprocess  up-sampling of mask logits to image size + threshold
    fusion_head       fusion module + logits (+ softmax in the reference)
    other             total minus the phases above (ours: softmax, top-k selection, Instances)
    total             the whole pipeline

Ours are timed inside the real calls: the sub-modules' methods (``head.sam.encode_image``,
``head.clip.dense_features``, ``head.sam.decode_prompts``, ...) are wrapped by timers for the
subprocess, so the totals are those of the unchanged code paths. The speed-up of a mode is
reference total / mode total. Agreement (from the last timed round): max |logits_ref - logits_ours|
for each mode (must be < ``--logits-tol``, 1e-4 in fp32), and the fraction of mask pixels that
differ between the reference's masks and ours for the same regions.

Memory: each of reference / ours_eval_masks / ours_cls_only also runs in a subprocess of its own
(one pipeline run after the build), so the peaks are separable; the reference's subprocess builds
the model with ``SAM.FAST_PATH False`` (the stock SAM, nothing else). On CPU the peak resident set
size (VmHWM): after the build the kernel's high-water mark is reset (``/proc/self/clear_refs``), so
``peak_rss_mb`` is the peak while running and ``peak_rss_growth_mb = peak_rss_mb -
rss_after_build_mb``; where the reset is not possible the peak is the whole process's
(``peak_rss_reset: false``). On CUDA ``torch.cuda.max_memory_allocated`` after a reset.

Precision (``--precision fp32 bf16 fp16``): one comparison job per precision, with our pipelines'
frozen SAM and CLIP under autocast (``MODEL.REGIONSPOT.FROZEN_PRECISION``) and the reference always
in fp32, so the speed-up is over the fp32 baseline. In fp16/bf16 the logits are not held to
``--logits-tol``: the table reports their max difference and the top-1 class agreement instead.

Throughput (``--batch-images 1 4 8``): images per second of the model's evaluation forward
(``model(batched_inputs)``) with B images per call, SAM's and CLIP's encoders running once per call
on all B images; one job per variant, N and precision.

Start-up (``--startup``): the time to get the text embeddings of the LVIS vocabulary (1203 names,
81 prompt templates) from the cache vs encoding them. Encoding all 1203 x 81 sentences at real size
takes hours on a small CPU, so it is extrapolated linearly from K classes (``--startup-classes``);
the cache hit of the full vocabulary is derived from a real hit on a 1203-name entry encoded with
the tiny CLIP, corrected for the real-size text tower's fingerprint hash and entry size (both
measured). The report says which numbers are measured, extrapolated or derived.

Examples::

    # full comparison (CPU); a persistent --cache-dir keeps the vocabulary's text embeddings
    python tools/benchmark.py --variants BB BL --num-boxes 1 10 100 --repeats 3 --warmup 1 \\
        --cache-dir output/benchmark_text_cache --output-json output/benchmark_cpu.json --markdown
    # memory sweep of the evaluation path (reference at N=1000 needs a lot of RAM)
    python tools/benchmark.py --variants BB --skip-compare --memory-n 10 100 1000 \\
        --cache-dir output/benchmark_text_cache --output-json output/benchmark_memory.json
    # start-up: text embeddings of the LVIS vocabulary, cache hit vs encoding
    python tools/benchmark.py --variants BB BL --skip-compare --startup --startup-classes 40
    # GPU: fp32 / bf16 / fp16 against the fp32 baseline, and images/s with 1, 4 and 8 images per call
    python tools/benchmark.py --device cuda --variants BB BL --num-boxes 10 100 --precision fp32 bf16 fp16 \
        --batch-images 1 4 8 --repeats 5 --warmup 2 --output-json output/benchmark_gpu.json --markdown
    # quick smoke run with the tiny models
    python tools/benchmark.py --variants tiny --num-boxes 0 1 3 --repeats 1 --warmup 0
"""
import argparse
import collections
import contextlib
import functools
import gc
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
    "tiny": "configs/Quickstart/RegionSpot-tiny_shapes.yaml",
}
MODES = ("reference", "ours_eval_masks", "ours_predictor_masks", "ours_cls_only")
# Modes measured for memory, each in a subprocess of its own.
MEMORY_MODES = ("reference", "ours_eval_masks", "ours_cls_only")
MODE_PHASES = ("sam_encoder", "clip", "mask_decoder", "mask_postprocess", "fusion_head")
MODE_DESCRIPTIONS = {
    "reference": "stock SamPredictor + stock decoder on all N at once + full masks for all N + CLIP + fusion",
    "ours_eval_masks": "head.recognize (top-k, DETECTIONS_PER_IMAGE) + kept masks via to_bitmasks",
    "ours_predictor_masks": "RegionSpotPredictor.set_image + predict(boxes): masks for every region",
    "ours_cls_only": "RegionSpotPredictor.set_image + predict(boxes, return_masks=False)",
}
# Legacy view of ours (the keys of the earlier version of this tool; see legacy_phases()).
PHASES = (
    "sam_encoder",
    "clip",
    "prompt_decoding",
    "fusion_head",
    "mask_postprocess",
    "total",
    "eval_path_total",
)
COMPONENT_PHASES = PHASES[:5]
DEFAULT_VOCABULARY = (
    "person", "cup", "coffee", "spoon", "plate", "table", "dog", "car", "chair", "bottle",
)
RANDOM_IMAGE_HW = (512, 600)


# ---------------------------------------------------------------------------------------------
# Machine description
def cpu_model() -> str:
    """The CPU's ``Model name`` as ``lscpu`` gives it (else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _load_average():
    if hasattr(os, "getloadavg"):
        return [round(x, 2) for x in os.getloadavg()]
    return []


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
        "load_average_at_start": _load_average(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
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


def lvis_vocabulary():
    """The 1203 LVIS v1 class names as detectron2's ``lvis_v1_*`` datasets name them (by category id)."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [c["synonyms"][0] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]


# ---------------------------------------------------------------------------------------------
# Worker helpers
def build_cfg(variant: str, device: str, cache_dir: str, vocabulary, fast_path: bool = True, precision: str = "fp32"):
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
        "MODEL.REGIONSPOT.SAM.FAST_PATH", bool(fast_path),
        "MODEL.REGIONSPOT.FROZEN_PRECISION", precision,
        "MODEL.REGIONSPOT.CLIP.WEIGHTS", "",
        "MODEL.REGIONSPOT.VOCABULARY", "custom",
        "MODEL.REGIONSPOT.CUSTOM_VOCABULARY", list(vocabulary),
        "MODEL.REGIONSPOT.TEXT_CACHE_DIR", cache_dir,
    ])
    cfg.freeze()
    return cfg


def _proc_status_mb(field: str) -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _current_rss_mb() -> float:
    return _proc_status_mb("VmRSS")


def _maxrss_mb() -> float:
    """Peak RSS: VmHWM (reset by _reset_peak_rss), else getrusage's ru_maxrss."""
    hwm = _proc_status_mb("VmHWM")
    if hwm == hwm:  # not NaN
        return hwm
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


class PhaseRecorder:
    """
    Times named phases of one pipeline run. Nested phases are not double counted: only the
    outermost open phase records (so a wrapped method called inside an explicitly timed phase of the
    reference adds nothing of its own).
    """

    def __init__(self, sync):
        self.sync = sync
        self.times = None
        self.captured = {}
        self._depth = 0

    @contextlib.contextmanager
    def run(self):
        times = collections.defaultdict(float)
        self.times, self.captured, self._depth = times, {}, 0
        self.sync()
        start = time.perf_counter()
        try:
            yield times
        finally:
            self.sync()
            times["total"] = time.perf_counter() - start
            times["other"] = max(times["total"] - sum(times[p] for p in MODE_PHASES), 0.0)
            self.times = None

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.times is None or self._depth > 0:
            yield
            return
        self._depth += 1
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] += time.perf_counter() - start
            self._depth -= 1


def instrument(obj, method: str, recorder: PhaseRecorder, phase: str, capture: str = ""):
    """Wrap ``obj.method`` (an instance attribute shadowing the class's method) with a phase timer."""
    original = getattr(obj, method)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with recorder.phase(phase):
            out = original(*args, **kwargs)
        if capture and recorder.times is not None:
            recorder.captured[capture] = out
        return out

    setattr(obj, method, wrapper)


def instrument_head(head, recorder: PhaseRecorder):
    """Time our pipeline's phases inside the real calls (recognize, set_image, predict)."""
    instrument(head.sam, "encode_image", recorder, "sam_encoder")
    instrument(head.clip, "image_to_tensor", recorder, "clip")
    instrument(head.clip, "dense_features", recorder, "clip")
    instrument(head.sam, "decode_prompts", recorder, "mask_decoder")
    instrument(head.sam, "postprocess_masks", recorder, "mask_postprocess")
    instrument(head, "region_embeddings", recorder, "fusion_head")
    instrument(head, "logits", recorder, "fusion_head", capture="logits")


class ReferencePipeline:
    """
    The straightforward pipeline with the stock packages: ``segment_anything.SamPredictor`` for the
    image, the stock prompt encoder and mask decoder on all N boxes at once, ``Sam.postprocess_masks``
    + threshold for all N, then CLIP dense features, the fusion module, logits and softmax of ``head``.

    The region token is read by a forward hook on ``mask_decoder.transformer`` (``hs[:, 1]``, the
    single-mask token after the final attention and norm), as segment_anything does not return it.
    """

    def __init__(self, sam, head, recorder: PhaseRecorder):
        from segment_anything import SamPredictor

        from segment_anything.modeling.image_encoder import Attention

        for m in sam.image_encoder.modules():
            if isinstance(m, Attention) and "forward" in vars(m):
                raise ValueError("The reference SAM must use the stock encoder attention (build it without FAST_PATH).")
        self.sam = sam
        self.predictor = SamPredictor(sam)
        self.head = head
        self.recorder = recorder
        self._token = None
        sam.mask_decoder.transformer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, outputs):
        self._token = outputs[0][:, 1, :]

    def __call__(self, image, boxes_np) -> dict:
        import numpy as np
        import torch

        rec, sam, head, predictor = self.recorder, self.sam, self.head, self.predictor
        n = len(boxes_np)
        with rec.phase("sam_encoder"):
            predictor.set_image(image)  # ResizeLongestSide + preprocess + stock image encoder
        with rec.phase("clip"), _fp32(head.clip):
            feats = head.clip.dense_features(head.clip.image_to_tensor(image))
        with rec.phase("mask_decoder"):
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
        with rec.phase("mask_postprocess"):
            if n:
                masks = sam.postprocess_masks(low_res, predictor.input_size, predictor.original_size)
                masks = masks[:, 0] > sam.mask_threshold
            else:
                masks = torch.zeros((0, *predictor.original_size), dtype=torch.bool, device=predictor.device)
        with rec.phase("fusion_head"):
            logits = head.logits(head.region_embeddings(tokens[None], feats)[0])
            probs = logits.softmax(dim=-1)
        return {"logits": logits, "probs": probs, "masks": masks}


@contextlib.contextmanager
def _fp32(frozen_module):
    """Run a frozen module in fp32 whatever its FROZEN_PRECISION (the reference is the fp32 baseline)."""
    saved = frozen_module.precision
    frozen_module.precision = "fp32"
    try:
        yield
    finally:
        frozen_module.precision = saved


def _summarise_runs(runs):
    """List of per-round phase dicts (seconds) -> phases_ms (median), phases_ms_runs, total_ms."""
    keys = [p for p in MODE_PHASES if any(p in r for r in runs)] + ["other", "total"]
    phases_runs = {k: [r.get(k, 0.0) * 1000.0 for r in runs] for k in keys}
    phases = {k: statistics.median(v) for k, v in phases_runs.items()}
    return {"phases_ms": phases, "phases_ms_runs": phases_runs, "total_ms": phases["total"]}


def _prepare(spec, fast_path: bool):
    """Common set-up of the compare and memory workers: inputs, config, timed build."""
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
    precision = spec.get("precision", "fp32")
    cfg = build_cfg(spec["variant"], device, spec["cache_dir"], spec["vocabulary"], fast_path, precision)

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
    predictor.model.eval()
    head = predictor.head

    boxes = torch.as_tensor(boxes_np)
    regions = Instances((height, width))
    regions.proposal_boxes = Boxes(boxes.to(device))
    info = {
        "variant": spec["variant"],
        "config": VARIANT_CONFIGS[spec["variant"]],
        "sam_type": cfg.MODEL.REGIONSPOT.SAM.TYPE,
        "clip_type": cfg.MODEL.REGIONSPOT.CLIP.TYPE,
        "clip_input_size": cfg.MODEL.REGIONSPOT.CLIP.INPUT_SIZE,
        "num_boxes": spec["num_boxes"],
        "precision": precision,
        "num_classes": head.num_classes,
        "detections_per_image": head.detections_per_image,
        "topk": head.topk,
        "scoring": head.scoring,
        "prompt_chunk_size": head.prompt_chunk_size,
        "device": device,
        "image": image_desc,
        "image_hw": [height, width],
        "torch_num_threads": torch.get_num_threads(),
        "build_s": build_s,
        "vocabulary_s": vocabulary_s[0],
        "text_embeddings_encoded_in_build": bool(cache_after - cache_before),
    }
    return {
        "cfg": cfg, "predictor": predictor, "head": head, "image": image, "boxes_np": boxes_np,
        "boxes": boxes, "regions": regions, "sync": sync, "is_cuda": is_cuda, "info": info,
    }


def _start_memory_measurement(ctx) -> dict:
    import torch

    gc.collect()
    mem = {"rss_after_build_mb": _current_rss_mb(), "build_peak_rss_mb": _maxrss_mb()}
    if ctx["is_cuda"]:
        dev = torch.device(ctx["info"]["device"])
        ctx["info"]["device_name"] = torch.cuda.get_device_name(dev)
        mem["gpu_mem_after_build_mb"] = torch.cuda.memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
    mem["peak_rss_reset"] = _reset_peak_rss()
    return mem


def _finish_memory_measurement(ctx, mem: dict) -> dict:
    import torch

    mem["peak_rss_mb"] = _maxrss_mb()
    mem["peak_rss_growth_mb"] = mem["peak_rss_mb"] - mem["rss_after_build_mb"]
    if ctx["is_cuda"]:
        dev = torch.device(ctx["info"]["device"])
        mem["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        mem["gpu_peak_growth_mb"] = mem["gpu_peak_mb"] - mem["gpu_mem_after_build_mb"]
    return mem


def _mode_callables(ctx, recorder, reference):
    """mode name -> function running that mode once (inside recorder.run()) and returning its outputs."""
    head, predictor, image = ctx["head"], ctx["predictor"], ctx["image"]
    boxes, boxes_np, regions = ctx["boxes"], ctx["boxes_np"], ctx["regions"]
    height, width = image.shape[:2]

    def ours_eval_masks():
        inst = head.recognize(image, regions)
        out = {"instances": inst, "logits": recorder.captured.get("logits")}
        if inst.has("pred_masks"):
            out["region_index"] = inst.pred_masks.index
            with recorder.phase("mask_postprocess"):
                out["masks"] = inst.pred_masks.to_bitmasks(None, height, width).tensor
        return out

    def ours_predictor_masks():
        predictor.set_image(image)
        return predictor.predict(boxes)

    def ours_cls_only():
        predictor.set_image(image)
        return predictor.predict(boxes, return_masks=False)

    modes = {
        "ours_eval_masks": ours_eval_masks,
        "ours_predictor_masks": ours_predictor_masks,
        "ours_cls_only": ours_cls_only,
    }
    if reference is not None:
        modes = {"reference": lambda: reference(image, boxes_np), **modes}
    return modes


def _max_abs_diff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max().item())


def _pixel_disagreement(a, b):
    """(fraction of differing pixels, number of differing pixels) of two bool mask stacks."""
    if a.numel() == 0:
        return 0.0, 0
    diff = int((a != b).sum().item())
    return diff / a.numel(), diff


def _top1_agreement(a, b) -> float:
    """Fraction of regions whose highest-scoring class is the same in two [N, C] logit tensors."""
    if a is None or b is None:
        return float("nan")
    if a.shape[0] == 0:
        return 1.0
    return float((a.argmax(dim=-1) == b.argmax(dim=-1)).float().mean().item())


def agreement(outputs: dict, num_boxes: int, tol: float, precision: str = "fp32") -> dict:
    """
    Reference (fp32) vs ours on the outputs of one round. The logits tolerance is checked in fp32
    only; with reduced-precision frozen models (fp16/bf16) the differences are reported, and
    ``logits_within_tolerance`` is None.
    """
    ref = outputs["reference"]
    ref_logits = ref["logits"]
    ev, pr, cl = outputs["ours_eval_masks"], outputs["ours_predictor_masks"], outputs["ours_cls_only"]
    diffs = {
        "ours_eval_masks": _max_abs_diff(ev["logits"], ref_logits),
        "ours_predictor_masks": _max_abs_diff(pr["logits"], ref_logits),
        "ours_cls_only": _max_abs_diff(cl["logits"], ref_logits),
    }
    worst = max(diffs.values())
    out = {
        "precision": precision,
        "logits_max_abs_diff": diffs,
        "logits_max_abs_diff_max": worst,
        "logits_tolerance": tol,
        # False for NaN too; None (not checked) in reduced precision.
        "logits_within_tolerance": bool(worst < tol) if precision == "fp32" else None,
        "top1_class_agreement_cls_only": _top1_agreement(cl["logits"], ref_logits),
        "logits_abs_max_reference": float(ref_logits.abs().max().item()) if num_boxes else 0.0,
        "probs_max_abs_diff_cls_only": _max_abs_diff(cl["scores"], ref["probs"]),
    }
    frac, count = _pixel_disagreement(pr["masks"], ref["masks"])
    out["mask_pixels_differing_fraction"] = {"ours_predictor_masks": frac}
    out["mask_pixels_differing"] = {"ours_predictor_masks": count}
    out["mask_pixels_compared"] = {"ours_predictor_masks": int(ref["masks"].numel())}
    inst = ev["instances"]
    out["eval_num_detections"] = len(inst)
    if "masks" in ev:
        idx = ev["region_index"]
        out["eval_num_mask_regions"] = int(idx.unique().numel()) if len(idx) else 0
        frac, count = _pixel_disagreement(ev["masks"], ref["masks"][idx])
        out["mask_pixels_differing_fraction"]["ours_eval_masks"] = frac
        out["mask_pixels_differing"]["ours_eval_masks"] = count
        out["mask_pixels_compared"]["ours_eval_masks"] = int(ev["masks"].numel())
        if len(inst):
            ref_scores = ref["probs"][idx, inst.pred_classes]
            out["eval_scores_max_abs_diff"] = _max_abs_diff(inst.scores, ref_scores)
        else:
            out["eval_scores_max_abs_diff"] = 0.0
    return out


def legacy_phases(modes: dict) -> dict:
    """The earlier tool's keys, from ours_predictor_masks (+ eval_path_total from ours_eval_masks)."""
    pred, ev = modes["ours_predictor_masks"], modes["ours_eval_masks"]

    def runs(mode, key):
        return mode["phases_ms_runs"].get(key, [0.0] * len(mode["phases_ms_runs"]["total"]))

    phases_runs = {
        "sam_encoder": runs(pred, "sam_encoder"),
        "clip": runs(pred, "clip"),
        "prompt_decoding": runs(pred, "mask_decoder"),
        "fusion_head": runs(pred, "fusion_head"),
        "mask_postprocess": runs(pred, "mask_postprocess"),
        "total": runs(pred, "total"),
        "eval_path_total": runs(ev, "total"),
    }
    return {"phases_ms": {k: statistics.median(v) for k, v in phases_runs.items()}, "phases_ms_runs": phases_runs}


# ---------------------------------------------------------------------------------------------
# Workers
def run_compare_worker(spec: dict) -> dict:
    """Timing and agreement of the reference and our three modes on the same inputs and weights."""
    import torch

    from regionspot.modeling.sam_tokens import build_sam

    ctx = _prepare(spec, fast_path=True)
    head, sync, info = ctx["head"], ctx["sync"], ctx["info"]
    rs = ctx["cfg"].MODEL.REGIONSPOT
    n = spec["num_boxes"]
    recorder = PhaseRecorder(sync)
    instrument_head(head, recorder)

    result = {"kind": "compare", **info, "repeats": spec["repeats"], "warmup": spec["warmup"]}
    run_reference = n <= spec["skip_reference_above"]
    reference = None
    if run_reference:
        t0 = time.perf_counter()
        ref_sam = build_sam(rs.SAM.TYPE, "", True, rs.RANDOM_INIT_SEED).to(head.sam.device)
        ours_sd, ref_sd = head.sam.sam.state_dict(), ref_sam.state_dict()
        same = ours_sd.keys() == ref_sd.keys() and all(torch.equal(ours_sd[k], ref_sd[k]) for k in ours_sd)
        if not same:
            raise RuntimeError("The reference SAM's weights differ from ours: the seeds do not match.")
        reference = ReferencePipeline(ref_sam, head, recorder)
        result["reference_build_s"] = time.perf_counter() - t0
        result["reference_weights_identical"] = True
    else:
        result["reference_skipped"] = f"N={n} > --skip-reference-above {spec['skip_reference_above']}"
    result.update({"rss_after_build_mb": _current_rss_mb(), "build_peak_rss_mb": _maxrss_mb()})
    result["peak_rss_reset"] = _reset_peak_rss()

    modes = _mode_callables(ctx, recorder, reference)
    runs = {m: [] for m in modes}
    outputs = {}
    with torch.inference_mode():
        for i in range(spec["warmup"] + spec["repeats"]):
            timed = i >= spec["warmup"]
            for mode, fn in modes.items():
                with recorder.run() as times:
                    outputs[mode] = fn()
                if timed:
                    runs[mode].append(dict(times))
            totals = ", ".join(f"{m} {runs[m][-1]['total'] * 1000.0:.0f} ms" for m in modes) if timed else ""
            logger.info("%s N=%d: %s %d done%s", spec["variant"], n,
                        "run" if timed else "warm-up", (i - spec["warmup"] if timed else i) + 1,
                        f" ({totals})" if totals else "")

    result["modes"] = {m: _summarise_runs(r) for m, r in runs.items()}
    ref_total = result["modes"]["reference"]["total_ms"] if run_reference else None
    for m, summary in result["modes"].items():
        summary["description"] = MODE_DESCRIPTIONS[m]
        summary["speedup_vs_reference"] = (ref_total / summary["total_ms"]) if ref_total and summary["total_ms"] > 0 else None
    if run_reference:
        with torch.inference_mode():
            result["agreement"] = agreement(outputs, n, spec["logits_tol"], info["precision"])
    else:
        result["agreement"] = None
    result.update(legacy_phases(result["modes"]))
    result["components_sum_ms"] = sum(result["phases_ms"][p] for p in COMPONENT_PHASES)
    # Peak of this process while timing all modes together (the per-mode peaks come from the
    # memory subprocesses).
    result["peak_rss_mb"] = _maxrss_mb()
    result["peak_rss_growth_mb"] = result["peak_rss_mb"] - result["rss_after_build_mb"]
    result["load_average_at_end"] = _load_average()
    return result


def run_memory_worker(spec: dict) -> dict:
    """Peak memory of one mode, alone in this process."""
    import torch

    mode = spec["mode"]
    ctx = _prepare(spec, fast_path=(mode != "reference"))
    head = ctx["head"]
    recorder = PhaseRecorder(ctx["sync"])
    reference = ReferencePipeline(head.sam.sam, head, recorder) if mode == "reference" else None
    fn = _mode_callables(ctx, recorder, reference)[mode]
    result = {"kind": "memory", "mode": mode, "sam_fast_path": mode != "reference", **ctx["info"]}
    mem = _start_memory_measurement(ctx)
    with torch.inference_mode():
        with recorder.run() as times:
            out = fn()
        del out
    result.update(_finish_memory_measurement(ctx, mem))
    result["run_ms"] = times["total"] * 1000.0
    return result


def run_startup_worker(spec: dict) -> dict:
    """Text embeddings of the LVIS vocabulary: cache hit vs encoding (see the module docstring)."""
    import torch

    from regionspot.modeling import text_embeddings as te
    from regionspot.modeling.clip_features import ClipDenseFeatures, build_clip

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    # The short timings (fingerprints, cache hits, file reads) are medians of at least 5.
    repeats = max(int(spec["repeats"]), 5)
    cfg = build_cfg(spec["variant"], device, "", DEFAULT_VOCABULARY)
    rs = cfg.MODEL.REGIONSPOT
    batch = rs.TEXT_BATCH_SIZE
    templates = te.PROMPT_TEMPLATES
    t0 = time.perf_counter()
    real = ClipDenseFeatures(build_clip(rs.CLIP.TYPE, "", True, rs.RANDOM_INIT_SEED + 1), rs.CLIP.INPUT_SIZE).to(device)
    real_build_s = time.perf_counter() - t0
    tiny = ClipDenseFeatures(build_clip("tiny", "", True, rs.RANDOM_INIT_SEED + 1), 64).to(device)
    names = lvis_vocabulary()
    k = max(1, min(int(spec["startup_classes"]), len(names)))
    subset = names[:k]

    encode_calls = []
    original_encode = te.encode_vocabulary

    def timed_encode(*a, **kw):
        start = time.perf_counter()
        try:
            return original_encode(*a, **kw)
        finally:
            encode_calls.append(time.perf_counter() - start)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def median_of(fn):
        return statistics.median(timed(fn)[1] for _ in range(repeats))

    def cache_hit(cache_dir, clip_features, class_names):
        """A fresh cache object (as in a new process: the fingerprint is not memoised), must hit."""
        calls = len(encode_calls)
        emb, seconds = timed(lambda: te.TextEmbeddingCache(cache_dir).get(clip_features, class_names, templates, batch))
        if len(encode_calls) != calls:
            raise RuntimeError("Expected a cache hit but the vocabulary was encoded.")
        assert emb.shape[0] == len(class_names)
        return seconds

    result = {
        "kind": "startup",
        "variant": spec["variant"],
        "clip_type": rs.CLIP.TYPE,
        "device": device,
        "torch_num_threads": torch.get_num_threads(),
        "repeats": repeats,
        "num_templates": len(templates),
        "text_batch_size": batch,
        "vocabulary": "LVIS v1 (detectron2 lvis_v1_categories, synonyms[0] by id)",
        "vocabulary_size": len(names),
        "subset_classes": k,
        "subset": f"the first {k} LVIS names by category id",
        "real_clip_build_s": real_build_s,
        "embed_dim_real": real.embed_dim,
        "embed_dim_tiny": tiny.embed_dim,
    }
    te.encode_vocabulary = timed_encode
    try:
        with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="regionspot_startup_") as tmp:
            real_dir, tiny_dir = os.path.join(tmp, "real"), os.path.join(tmp, "tiny")
            # Fingerprint (hash of the text tower's weights) of the real-size and the tiny CLIP.
            result["real_fingerprint_s"] = median_of(lambda: te._text_tower_fingerprint(real))
            result["tiny_fingerprint_s"] = median_of(lambda: te._text_tower_fingerprint(tiny))

            # Real size, K classes: cold (miss: fingerprint + encode + write), then hits.
            logger.info("%s: encoding %d LVIS classes x %d templates with the real-size %s text tower",
                        spec["variant"], k, len(templates), rs.CLIP.TYPE)
            _, result["real_subset_cold_s"] = timed(lambda: te.TextEmbeddingCache(real_dir).get(real, subset, templates, batch))
            if len(encode_calls) != 1:
                raise RuntimeError("The cold start did not encode (the temporary cache was not empty?).")
            result["real_subset_encode_s"] = encode_calls[-1]
            result["real_subset_hit_s"] = statistics.median(cache_hit(real_dir, real, subset) for _ in range(repeats))

            # Tiny CLIP, all 1203 names: a real cache entry, then real hits on it.
            logger.info("%s: encoding all %d LVIS classes with the tiny CLIP (for the cache-hit measurement)",
                        spec["variant"], len(names))
            tiny_cache = te.TextEmbeddingCache(tiny_dir)
            _, result["tiny_full_cold_s"] = timed(lambda: tiny_cache.get(tiny, names, templates, batch))
            result["tiny_full_encode_s"] = encode_calls[-1]
            # Linearity check of the extrapolation, with the tiny CLIP: K classes vs all, both measured.
            _, result["tiny_subset_encode_s"] = timed(
                lambda: original_encode(tiny, subset, templates, batch_size=batch, show_progress=False))
            result["tiny_full_hit_s"] = statistics.median(cache_hit(tiny_dir, tiny, names) for _ in range(repeats))
            tiny_entry = tiny_cache.path(tiny_cache.key(tiny, names, templates))
            result["tiny_full_entry_bytes"] = os.path.getsize(tiny_entry)
            result["tiny_full_entry_load_s"] = median_of(lambda: torch.load(tiny_entry, map_location="cpu", weights_only=True))
            # A file of the real entry's payload (1203 names + [1203, D_t] float32), NOT a cache entry:
            # only its read time is used, to correct the tiny entry's read time for the size.
            payload = os.path.join(tmp, "payload_real_size.pt")
            torch.save({"class_names": names, "embeddings": torch.zeros(len(names), real.embed_dim)}, payload)
            result["real_size_payload_bytes"] = os.path.getsize(payload)
            result["real_size_payload_load_s"] = median_of(lambda: torch.load(payload, map_location="cpu", weights_only=True))
    finally:
        te.encode_vocabulary = original_encode

    r = result
    scale = len(names) / k
    r["full_cold_extrapolated_s"] = (r["real_subset_cold_s"] - r["real_subset_encode_s"]) + r["real_subset_encode_s"] * scale
    r["full_hit_derived_s"] = (
        r["tiny_full_hit_s"] - r["tiny_fingerprint_s"] + r["real_fingerprint_s"]
        + (r["real_size_payload_load_s"] - r["tiny_full_entry_load_s"])
    )
    r["full_ratio"] = r["full_cold_extrapolated_s"] / r["full_hit_derived_s"] if r["full_hit_derived_s"] > 0 else None
    r["tiny_full_encode_extrapolated_s"] = r["tiny_subset_encode_s"] * scale
    r["subset_ratio_measured"] = r["real_subset_cold_s"] / r["real_subset_hit_s"] if r["real_subset_hit_s"] > 0 else None
    r["ratio_target"] = 50.0
    r["load_average_at_end"] = _load_average()
    return r


def run_throughput_worker(spec: dict) -> dict:
    """
    Images per second of the model's evaluation forward (``model(batched_inputs)``, the call
    detectron2's ``inference_on_dataset`` makes) with B images per call, so that SAM's and CLIP's
    image encoders each run once per call on all B images. Every image is the benchmark image with
    the same N boxes as GT boxes (BOX_SOURCE "GT"); the model's postprocess materialises the kept
    detections' masks at image size, as an evaluator reads them.
    """
    import torch
    from detectron2.structures import Boxes, Instances

    ctx = _prepare(spec, fast_path=True)
    model, image, sync, info = ctx["predictor"].model, ctx["image"], ctx["sync"], ctx["info"]
    height, width = image.shape[:2]
    pixels = image if ctx["cfg"].INPUT.FORMAT == "RGB" else image[:, :, ::-1]
    tensor = torch.as_tensor(pixels.transpose(2, 0, 1).copy())
    gt = Instances((height, width))
    gt.gt_boxes = Boxes(ctx["boxes"].clone())
    gt.gt_classes = torch.zeros(len(gt), dtype=torch.int64)

    def one_call(batch_size):
        batch = [{"image": tensor, "height": height, "width": width, "instances": gt} for _ in range(batch_size)]
        sync()
        start = time.perf_counter()
        outputs = model(batch)  # the postprocess materialises the kept detections' masks
        sync()
        return time.perf_counter() - start, outputs

    result = {"kind": "throughput", **info, "repeats": spec["repeats"], "warmup": spec["warmup"], "batches": []}
    with torch.inference_mode():
        for batch_size in spec["batch_images"]:
            for _ in range(spec["warmup"]):
                one_call(batch_size)
            seconds = [one_call(batch_size)[0] for _ in range(spec["repeats"])]
            median = statistics.median(seconds)
            result["batches"].append({
                "images_per_call": batch_size,
                "call_s_runs": seconds,
                "call_s": median,
                "images_per_s": batch_size / median,
            })
            logger.info("%s N=%d %s: %d image(s) per call, %.2f images/s", spec["variant"], spec["num_boxes"],
                        info["precision"], batch_size, batch_size / median)
    base = result["batches"][0]["images_per_s"]
    for b in result["batches"]:
        b["images_per_s_vs_first"] = b["images_per_s"] / base
    if ctx["is_cuda"]:
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(info["device"])) / 2**20
    return result


WORKERS = {
    "compare": run_compare_worker,
    "memory": run_memory_worker,
    "startup": run_startup_worker,
    "throughput": run_throughput_worker,
}


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per job, then the report
def _job_label(spec: dict) -> str:
    parts = [spec["kind"], spec["variant"]]
    if "num_boxes" in spec:
        parts.append(f"N={spec['num_boxes']}")
    if spec.get("precision", "fp32") != "fp32":
        parts.append(spec["precision"])
    if "mode" in spec:
        parts.append(spec["mode"])
    return " ".join(parts)


def run_job(spec: dict, timeout=None) -> dict:
    ident = {k: spec[k] for k in ("kind", "variant", "num_boxes", "mode", "precision") if k in spec}
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
            return {**ident, "error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not os.path.isfile(out_path):
            why = f"worker exited with code {proc.returncode}"
            if proc.returncode in (-9, 137):
                why += " (killed by SIGKILL: out of memory?)"
            return {**ident, "error": why + " (see its log above)"}
        with open(out_path, encoding="utf-8") as f:
            return json.load(f)


def _fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "nan"
    return f"{x:.{digits}f}"


def _sci(x):
    if x is None:
        return "-"
    return f"{x:.1e}"


def _table(rows, headers, markdown: bool) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True)


def phases_table(results, markdown: bool) -> str:
    headers = (["variant", "N", "precision", "mode"] + [f"{p} ms" for p in MODE_PHASES]
               + ["other ms", "total ms", "images/s", "speed-up"])
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], r["num_boxes"], r.get("precision", "fp32"), "ERROR: " + r["error"]]
                        + [""] * (len(headers) - 4))
            continue
        for mode, m in r["modes"].items():
            ph = m["phases_ms"]
            speedup = "1.00x (ref)" if mode == "reference" else (
                f"{m['speedup_vs_reference']:.2f}x" if m.get("speedup_vs_reference") else "-")
            # The reference always runs in fp32.
            precision = "fp32" if mode == "reference" else r["precision"]
            rows.append([r["variant"], r["num_boxes"], precision, mode] + [_fmt(ph.get(p)) for p in MODE_PHASES]
                        + [_fmt(ph["other"]), _fmt(ph["total"]), _images_per_s(ph["total"]), speedup])
    return _table(rows, headers, markdown)


def _images_per_s(total_ms) -> str:
    return f"{1000.0 / total_ms:.3g}" if total_ms and total_ms > 0 else "-"


def agreement_table(results, markdown: bool) -> str:
    headers = [
        "variant", "N", "precision", "logits max-abs-diff eval", "logits max-abs-diff predictor", "logits max-abs-diff cls-only", "< tol",
        "top-1 class agreement",
        "mask px differing (predictor)", "mask px differing (eval, kept)", "eval dets / mask regions",
        "build s (vocab s)", "compare-process peak MB",
    ]
    rows = []
    for r in results:
        if "error" in r:
            continue
        a = r.get("agreement")
        build = f"{_fmt(r['build_s'], 1)} ({_fmt(r['vocabulary_s'], 1)})"
        if not a:
            rows.append([r["variant"], r["num_boxes"], r["precision"], "reference skipped"] + [""] * 7
                        + [build, _fmt(r["peak_rss_mb"], 0)])
            continue
        d = a["logits_max_abs_diff"]
        frac = a["mask_pixels_differing_fraction"]
        within = a["logits_within_tolerance"]
        rows.append([
            r["variant"], r["num_boxes"], r["precision"], _sci(d["ours_eval_masks"]), _sci(d["ours_predictor_masks"]),
            _sci(d["ours_cls_only"]), "n/a" if within is None else ("yes" if within else "NO"),
            f"{a['top1_class_agreement_cls_only'] * 100:.1f}%",
            f"{frac['ours_predictor_masks']:.2e}", f"{frac['ours_eval_masks']:.2e}" if "ours_eval_masks" in frac else "-",
            f"{a['eval_num_detections']} / {a.get('eval_num_mask_regions', '-')}", build, _fmt(r["peak_rss_mb"], 0),
        ])
    return _table(rows, headers, markdown)


def memory_table(memory, markdown: bool) -> str:
    by_key = collections.OrderedDict()
    for m in memory:
        by_key.setdefault((m["variant"], m["num_boxes"]), {})[m["mode"]] = m
    gpu = any(str(m.get("device", "")).startswith("cuda") for m in memory)
    unit = "GPU MB" if gpu else "RSS MB"
    headers = ["variant", "N", f"after build {unit}"]
    for mode in MEMORY_MODES:
        headers += [f"{mode} peak", f"{mode} growth"]
    headers += ["growth ref / ours_eval"]
    rows = []
    for (variant, n), modes in by_key.items():
        base = next((m for m in modes.values() if "error" not in m), None)
        row = [variant, n, _fmt(base.get("gpu_mem_after_build_mb" if gpu else "rss_after_build_mb"), 0) if base else "-"]
        growth = {}
        for mode in MEMORY_MODES:
            m = modes.get(mode)
            if m is None:
                row += ["skipped", ""]
            elif "error" in m:
                row += ["ERROR", m["error"]]
            else:
                peak = m["gpu_peak_mb"] if gpu else m["peak_rss_mb"]
                growth[mode] = m["gpu_peak_growth_mb"] if gpu else m["peak_rss_growth_mb"]
                row += [_fmt(peak, 0), _fmt(growth[mode], 0)]
        ratio = "-"
        if "reference" in growth and growth.get("ours_eval_masks", 0) > 0:
            ratio = f"{growth['reference'] / growth['ours_eval_masks']:.1f}x"
        rows.append(row + [ratio])
    return _table(rows, headers, markdown)


def throughput_table(throughput, markdown: bool) -> str:
    headers = ["variant", "N", "precision", "images per call", "call s (median)", "images/s", "vs first"]
    rows = []
    for r in throughput:
        if "error" in r:
            rows.append([r["variant"], r["num_boxes"], r.get("precision", "fp32"), "ERROR: " + r["error"], "", "", ""])
            continue
        for b in r["batches"]:
            rows.append([r["variant"], r["num_boxes"], r["precision"], b["images_per_call"], _fmt(b["call_s"], 3),
                         f"{b['images_per_s']:.3g}", f"{b['images_per_s_vs_first']:.2f}x"])
    return _table(rows, headers, markdown)


def startup_text(startup, markdown: bool) -> str:
    lines = []
    for s in startup:
        if "error" in s:
            lines.append(f"{s['variant']}: start-up measurement failed: {s['error']}")
            continue
        k, full = s["subset_classes"], s["vocabulary_size"]
        ratio = s["full_ratio"]
        verdict = "met" if ratio is not None and ratio >= s["ratio_target"] else "NOT met"
        items = [
            f"Variant {s['variant']} (CLIP {s['clip_type']} text tower, random weights, {s['num_templates']} templates, "
            f"batch {s['text_batch_size']}, {s['torch_num_threads']} torch thread(s), median of {s['repeats']} for the short timings)",
            f"[measured] fingerprint hash of the real-size text tower: {s['real_fingerprint_s']:.3f} s; of the tiny one: {s['tiny_fingerprint_s']:.4f} s",
            f"[measured] cold start, {k} classes ({s['subset']}), real size: {s['real_subset_cold_s']:.1f} s "
            f"(of which encoding {s['real_subset_encode_s']:.1f} s; fingerprint, key and write the rest)",
            f"[measured] cache hit, the same {k} classes, real size: {s['real_subset_hit_s'] * 1000:.1f} ms "
            f"-> measured ratio {s['subset_ratio_measured']:.0f}x",
            f"[EXTRAPOLATED from {k} of {full} classes, linear in the number of classes] cold start, all {full} classes: "
            f"{s['full_cold_extrapolated_s']:.0f} s (= {s['full_cold_extrapolated_s'] / 60:.1f} min) = non-encoding part "
            f"{s['real_subset_cold_s'] - s['real_subset_encode_s']:.2f} s + encoding {s['real_subset_encode_s']:.1f} s x {full}/{k}",
            f"[measured] cache hit of a real {full}-name entry encoded with the TINY CLIP: {s['tiny_full_hit_s'] * 1000:.1f} ms "
            f"(entry {s['tiny_full_entry_bytes'] / 1024:.0f} KiB, read {s['tiny_full_entry_load_s'] * 1000:.1f} ms; "
            f"encoding it with the tiny CLIP took {s['tiny_full_encode_s']:.1f} s)",
            f"[check of the linear extrapolation, tiny CLIP] encoding {k} classes x {full}/{k} = "
            f"{s['tiny_full_encode_extrapolated_s']:.1f} s vs all {full} classes measured {s['tiny_full_encode_s']:.1f} s",
            f"[measured] read of a file with the real entry's payload ({s['real_size_payload_bytes'] / 1024:.0f} KiB; not a cache entry): "
            f"{s['real_size_payload_load_s'] * 1000:.1f} ms",
            f"[DERIVED] cache hit, all {full} classes, real size = tiny hit - tiny fingerprint + real fingerprint "
            f"+ (real-size read - tiny read) = {s['full_hit_derived_s'] * 1000:.1f} ms",
            f"[DERIVED] ratio cold / cache hit, all {full} classes: {ratio:.0f}x (target >= {s['ratio_target']:.0f}x: {verdict})",
            "Cache hits read files just written (OS page cache warm); a fresh cache object is used for each hit, "
            "so the fingerprint is recomputed as in a new process.",
        ]
        if markdown:
            lines += [f"- {items[0]}"] + [f"  - {x}" for x in items[1:]]
        else:
            lines += [items[0]] + [f"    {x}" for x in items[1:]]
    return "\n".join(lines)


def machine_text(info: dict, args, image_desc: str, markdown: bool) -> str:
    mem_kind = "GPU memory (torch.cuda.max_memory_allocated)" if args.device.startswith("cuda") else "process RSS (VmHWM)"
    lines = [
        ("CPU", f"{info['cpu_model']} ({info['cpu_count']} logical CPUs, usable {info.get('usable_cpus', '?')}, "
                f"torch threads {info['torch_num_threads']})"),
        ("Device", f"{args.device}: {info['device_name']}"),
        ("Software", f"torch {info['torch_version']}, detectron2 {info['detectron2_version']}, "
                     f"Python {info['python_version']}"),
        ("Load average", f"start {', '.join(str(x) for x in info.get('load_average_at_start', [])) or 'n/a'}; "
                         f"end {', '.join(str(x) for x in info.get('load_average_at_end', [])) or 'n/a'}"),
        ("Image", image_desc),
        ("Protocol", f"random weights; {args.warmup} warm-up + median of {args.repeats} run(s); "
                     f"{len(args.vocabulary)} classes; memory = {mem_kind}, one subprocess per mode"),
    ]
    if markdown:
        return "\n".join(f"- **{k}**: {v}" for k, v in lines)
    return "\n".join(f"{k + ':':<24}{v}" for k, v in lines)


NOTES = """\
Modes: reference = SamPredictor-style pipeline with the stock segment_anything modules (stock encoder
attention; stock decoder on all N boxes in one call; full-resolution masks for all N); ours_eval_masks
= head.recognize + the kept detections' masks at image size (what evaluation produces); ours_predictor_masks
= RegionSpotPredictor.set_image + predict(boxes) (masks for every region); ours_cls_only = predict(boxes,
return_masks=False). Speed-up = reference total / mode total. Same image, boxes and weights for all.
Phase 'other' = total - listed phases (ours: softmax, top-k selection, Instances). Agreement: max |logits
difference| vs the reference (fp32 tolerance {tol:g}); mask px differing = fraction of pixels where our mask
and the reference's mask of the same region differ. The JSON keeps the earlier keys too: phases_ms = the
ours_predictor_masks phases (prompt_decoding = mask_decoder), eval_path_total = the ours_eval_masks total."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Latency, peak memory and agreement of RegionSpot vs a stock reference pipeline "
                    "(random weights; no weight files needed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--variants", nargs="+", default=["BB", "BL"], choices=sorted(VARIANT_CONFIGS),
                   help="model variants (BB/BL/BL336: real-size architectures; tiny: smoke test)")
    p.add_argument("--num-boxes", nargs="+", type=int, default=[1, 10, 100],
                   help="box prompts per image of the comparison (timing, agreement, per-mode memory)")
    p.add_argument("--skip-compare", action="store_true",
                   help="skip the comparison over --num-boxes (run only --memory-n and/or --startup)")
    p.add_argument("--no-memory", action="store_true",
                   help="do not run the per-mode memory subprocesses for the --num-boxes of the comparison")
    p.add_argument("--memory-n", nargs="+", type=int, default=[],
                   help="memory sweep: N values for which reference / ours_eval_masks / ours_cls_only each run "
                        "in a subprocess of their own (e.g. 10 100 1000)")
    p.add_argument("--skip-reference-above", type=int, default=1000,
                   help="do not run the reference for N above this (it holds N copies of the image tokens in "
                        "the decoder and N full-resolution masks; N=1000 needs tens of GB)")
    p.add_argument("--logits-tol", type=float, default=1e-4,
                   help="max |logits difference| allowed vs the reference (checked for fp32 only)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"],
                   help="FROZEN_PRECISION of our pipelines in the comparison, one job each (the reference always "
                        "runs in fp32: the speed-up is over the fp32 baseline). fp16/bf16 report the logits "
                        "difference and top-1 agreement instead of checking --logits-tol")
    p.add_argument("--batch-images", nargs="+", type=int, default=[],
                   help="throughput of the evaluation forward with this many images per model call, for each "
                        "--num-boxes and --precision (e.g. 1 4 8: SAM and CLIP encode the images of a call together)")
    p.add_argument("--startup", action="store_true",
                   help="measure the LVIS vocabulary's text embeddings: cache hit vs encoding (per variant)")
    p.add_argument("--startup-classes", type=int, default=40,
                   help="LVIS classes encoded at real size for --startup (extrapolated to 1203)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    p.add_argument("--image", default="coffee",
                   help="'coffee' or 'astronaut' (scikit-image sample photos, used at their size), "
                        "'random' (seeded 600x512), or an image file")
    p.add_argument("--seed", type=int, default=0, help="seed of the boxes, of a random image and of the fusion module")
    p.add_argument("--vocabulary", nargs="+", default=list(DEFAULT_VOCABULARY), help="class names")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in workers (0: torch default). On a machine shared with "
                        "other jobs, fewer threads than cores avoids OpenMP contention that can inflate "
                        "timings many times over")
    p.add_argument("--cache-dir", default="",
                   help="text-embedding cache directory (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per subprocess")
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
    if any(n < 0 for n in args.num_boxes) or any(n < 0 for n in args.memory_n):
        p.error("--num-boxes and --memory-n must be >= 0")
    if args.startup_classes < 1:
        p.error("--startup-classes must be >= 1")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error("--device must be cpu, cuda or cuda:K")
    if any(b < 1 for b in args.batch_images):
        p.error("--batch-images must be >= 1")
    if args.skip_compare and not args.memory_n and not args.startup and not args.batch_images:
        p.error("--skip-compare leaves nothing to do: add --memory-n, --batch-images and/or --startup")
    return args


def reference_memory_lower_bound_gib(variant: str, n: int) -> float:
    """
    GiB the stock mask decoder holds at once for N prompts, at the least (fp32): at the last GELU of
    ``output_upscaling`` the repeated positional encodings and the transformer's image output
    (2 x [N, C, g, g]) are alive with the last transposed convolution's output and the GELU's
    (2 x [N, C/8, 4g, 4g], each twice [N, C, g, g]). The actual peak is higher.
    """
    c, g = (32, 16) if variant == "tiny" else (256, 64)
    return n * (2 * c * g * g + 2 * (c // 8) * (4 * g) ** 2) * 4 / 2**30


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def plan_jobs(args, cache_dir: str):
    """The subprocess specs of the run, in order."""
    common = {
        "device": args.device, "image": args.image, "seed": args.seed, "vocabulary": list(args.vocabulary),
        "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "cache_dir": cache_dir,
        "skip_reference_above": args.skip_reference_above, "logits_tol": args.logits_tol,
    }
    jobs = []
    available = _mem_available_gib()
    for variant in args.variants:
        memory_n = [] if (args.no_memory or args.skip_compare) else list(args.num_boxes)
        memory_n += [n for n in args.memory_n if n not in memory_n]
        ref_n = sorted({n for n in ([] if args.skip_compare else args.num_boxes) + memory_n
                        if n <= args.skip_reference_above})
        if ref_n and args.device == "cpu":
            need = reference_memory_lower_bound_gib(variant, ref_n[-1])
            if need > 0.8 * available:
                logger.warning(
                    "%s: the reference at N=%d needs at least %.1f GiB in its mask decoder alone (N copies of "
                    "the image tokens and of the up-scaled features); %.1f GiB are available. It may be killed "
                    "for memory (reported as an error); lower --skip-reference-above to skip it.",
                    variant, ref_n[-1], need, available)
        if not args.skip_compare:
            jobs += [{**common, "kind": "compare", "variant": variant, "num_boxes": n, "precision": precision}
                     for n in args.num_boxes for precision in args.precision]
        for n in memory_n:
            for mode in MEMORY_MODES:
                if mode == "reference" and n > args.skip_reference_above:
                    logger.info("memory %s N=%d: reference skipped (--skip-reference-above %d)",
                                variant, n, args.skip_reference_above)
                    continue
                jobs.append({**common, "kind": "memory", "variant": variant, "num_boxes": n, "mode": mode})
        if args.batch_images:
            jobs += [{**common, "kind": "throughput", "variant": variant, "num_boxes": n, "precision": precision,
                      "batch_images": list(args.batch_images)}
                     for n in args.num_boxes for precision in args.precision]
        if args.startup:
            jobs.append({**common, "kind": "startup", "variant": variant, "startup_classes": args.startup_classes})
    return jobs


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s %(name)s] %(message)s")

    if args._worker:
        with open(args._worker, encoding="utf-8") as f:
            spec = json.load(f)
        result = WORKERS[spec["kind"]](spec)
        with open(args._worker_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    info = machine_info(args.device)
    _, image_desc = load_image(args.image, args.seed)
    collected = {"compare": [], "memory": [], "startup": [], "throughput": []}
    with tempfile.TemporaryDirectory(prefix="regionspot_text_cache_") as default_cache:
        cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else default_cache
        jobs = plan_jobs(args, cache_dir)
        for i, spec in enumerate(jobs, 1):
            label = _job_label(spec)
            logger.info("[%d/%d] %s (device %s)", i, len(jobs), label, args.device)
            t0 = time.perf_counter()
            r = run_job(spec, args.timeout)
            if "error" in r:
                logger.error("%s failed: %s", label, r["error"])
            else:
                logger.info("%s done in %.1f s", label, time.perf_counter() - t0)
            collected[spec["kind"]].append(r)
    info["load_average_at_end"] = _load_average()

    results, memory, startup = collected["compare"], collected["memory"], collected["startup"]
    throughput = collected["throughput"]
    worker_threads = sorted({r["torch_num_threads"] for r in results + memory + startup + throughput
                             if "torch_num_threads" in r})
    if worker_threads:
        info["torch_num_threads"] = worker_threads[0] if len(worker_threads) == 1 else worker_threads
    print(machine_text(info, args, image_desc, args.markdown))
    if results:
        print()
        print(NOTES.format(tol=args.logits_tol))
        print()
        print("Latency per phase (median ms)" + (":" if not args.markdown else "\n"))
        print(phases_table(results, args.markdown))
        print()
        print("Agreement with the reference (last timed round) and build" + (":" if not args.markdown else "\n"))
        print(agreement_table(results, args.markdown))
    if memory:
        print()
        print("Peak memory per mode, one subprocess each (peak while running one pipeline; growth = peak - after build)"
              + (":" if not args.markdown else "\n"))
        print(memory_table(memory, args.markdown))
    if throughput:
        print()
        print("Throughput of the evaluation forward, several images per call (frozen encoders batched)"
              + (":" if not args.markdown else "\n"))
        print(throughput_table(throughput, args.markdown))
    if startup:
        print()
        print("Start-up: text embeddings of the LVIS vocabulary" + (":" if not args.markdown else "\n"))
        print(startup_text(startup, args.markdown))

    disagreements = [r for r in results if r.get("agreement") and r["agreement"]["logits_within_tolerance"] is False]
    for r in disagreements:
        logger.error("%s N=%d: logits differ from the reference by %.3g (> %g)", r["variant"], r["num_boxes"],
                     r["agreement"]["logits_max_abs_diff_max"], args.logits_tol)
    if args.output_json:
        out_dir = os.path.dirname(os.path.abspath(args.output_json))
        os.makedirs(out_dir, exist_ok=True)
        payload = {
            "machine": info,
            "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "image": image_desc,
            "modes": {m: MODE_DESCRIPTIONS[m] for m in MODES},
            "mode_phases": list(MODE_PHASES) + ["other", "total"],
            "phases": list(PHASES),
            "results": results,
            "memory": memory,
            "startup": startup,
            "throughput": throughput,
        }
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        logger.info("Wrote %s", args.output_json)
    failed = any("error" in r for r in results + memory + startup + throughput)
    return 1 if failed or disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
