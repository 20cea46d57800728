"""
The measurements, one kind per function, each meant to run alone in a fresh process (so that the
builds, caches and memory peaks of one job do not leak into the next):

    compare     timing of the reference and our three pipelines on the same inputs and weights, and
                their agreement
    memory      the peak memory of one pipeline, alone in its process
    throughput  images per second of the evaluation forward with several images per call
    startup     the LVIS vocabulary's text embeddings: cache hit vs encoding

``python -m regionspot.benchmarking.workers SPEC_JSON OUT_JSON`` runs the job a spec describes (the
dicts ``tools/benchmark.py`` plans) and writes its row.
"""
import logging
import os
import statistics
import sys
import tempfile
import time

from .inputs import DEFAULT_VOCABULARY, VARIANT_CONFIGS, build_cfg, load_image, lvis_vocabulary, random_boxes
from .keys import (
    KIND_COMPARE,
    KIND_MEMORY,
    KIND_STARTUP,
    KIND_THROUGHPUT,
    MASK_POSTPROCESS,
    MODE_DESCRIPTIONS,
    OURS_CLS_ONLY,
    OURS_EVAL_MASKS,
    OURS_PREDICTOR_MASKS,
    REFERENCE,
    TOTAL,
)
from .machine import load_average
from .reference import ReferencePipeline, agreement, build_reference_sam
from .timing import (
    PhaseRecorder,
    current_rss_mb,
    finish_memory_measurement,
    instrument_head,
    peak_rss_mb,
    reset_peak_rss,
    start_memory_measurement,
    summarise_runs,
)

logger = logging.getLogger("regionspot.benchmark")


def prepare(spec: dict, fast_path: bool) -> dict:
    """Common set-up of the compare, memory and throughput jobs: inputs, config, timed build."""
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
        "detections_per_image": head.selector.detections_per_image,
        "topk": head.selector.topk,
        "scoring": head.selector.scoring,
        "prompt_chunk_size": head.prompt_chunk_size,
        "device": device,
        "image": image_desc,
        "image_hw": [height, width],
        "torch_num_threads": torch.get_num_threads(),
        "build_s": build_s,
        "vocabulary_s": vocabulary_s[0],
        "text_embeddings_encoded_in_build": bool(cache_after - cache_before),
    }
    if is_cuda:
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return {
        "cfg": cfg, "predictor": predictor, "head": head, "image": image, "boxes_np": boxes_np,
        "boxes": boxes, "regions": regions, "sync": sync, "is_cuda": is_cuda, "info": info,
    }


def mode_callables(ctx: dict, recorder: PhaseRecorder, reference=None) -> dict:
    """mode -> function running that pipeline once (inside ``recorder.run()``) and returning its outputs."""
    head, predictor, image = ctx["head"], ctx["predictor"], ctx["image"]
    boxes, boxes_np, regions = ctx["boxes"], ctx["boxes_np"], ctx["regions"]
    height, width = image.shape[:2]

    def ours_eval_masks():
        inst = head.recognize(image, regions)
        out = {"instances": inst, "logits": recorder.captured.get("logits")}
        if inst.has("pred_masks"):
            out["region_index"] = inst.pred_masks.index
            with recorder.phase(MASK_POSTPROCESS):
                out["masks"] = inst.pred_masks.to_bitmasks(None, height, width).tensor
        return out

    def ours_predictor_masks():
        predictor.set_image(image)
        return predictor.predict(boxes)

    def ours_cls_only():
        predictor.set_image(image)
        return predictor.predict(boxes, return_masks=False)

    modes = {OURS_EVAL_MASKS: ours_eval_masks, OURS_PREDICTOR_MASKS: ours_predictor_masks, OURS_CLS_ONLY: ours_cls_only}
    if reference is not None:
        modes = {REFERENCE: lambda: reference(image, boxes_np), **modes}
    return modes


def run_compare(spec: dict) -> dict:
    """Timing and agreement of the reference and our three pipelines on the same inputs and weights."""
    import torch

    ctx = prepare(spec, fast_path=True)
    head, sync, info = ctx["head"], ctx["sync"], ctx["info"]
    rs = ctx["cfg"].MODEL.REGIONSPOT
    n = spec["num_boxes"]
    recorder = PhaseRecorder(sync)
    instrument_head(head, recorder)

    result = {"kind": KIND_COMPARE, **info, "repeats": spec["repeats"], "warmup": spec["warmup"]}
    run_reference = n <= spec["skip_reference_above"]
    reference = None
    if run_reference:
        t0 = time.perf_counter()
        reference = ReferencePipeline(build_reference_sam(head, rs.SAM.TYPE, ctx["cfg"].MODEL.REGIONSPOT.FROZEN.SEED), head, recorder)
        result["reference_build_s"] = time.perf_counter() - t0
        result["reference_weights_identical"] = True
    else:
        result["reference_skipped"] = f"N={n} > --skip-reference-above {spec['skip_reference_above']}"
    result.update({"rss_after_build_mb": current_rss_mb(), "build_peak_rss_mb": peak_rss_mb()})
    result["peak_rss_reset"] = reset_peak_rss()

    modes = mode_callables(ctx, recorder, reference)
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
            totals = ", ".join(f"{m} {runs[m][-1][TOTAL] * 1000.0:.0f} ms" for m in modes) if timed else ""
            logger.info("%s N=%d: %s %d done%s", spec["variant"], n,
                        "run" if timed else "warm-up", (i - spec["warmup"] if timed else i) + 1,
                        f" ({totals})" if totals else "")

    result["modes"] = {}
    for m, r in runs.items():
        result["modes"][m] = {"description": MODE_DESCRIPTIONS[m], **summarise_runs(r)}
    ref_total = result["modes"][REFERENCE]["phases_ms"][TOTAL] if run_reference else None
    for summary in result["modes"].values():
        total = summary["phases_ms"][TOTAL]
        summary["speedup_vs_reference"] = (ref_total / total) if ref_total and total > 0 else None
    if run_reference:
        with torch.inference_mode():
            result["agreement"] = agreement(outputs, n, spec["logits_tol"], info["precision"])
    else:
        result["agreement"] = None
    # Peak of this process while timing all modes together (the per-mode peaks come from the
    # memory jobs).
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_rss_growth_mb"] = result["peak_rss_mb"] - result["rss_after_build_mb"]
    result["load_average_at_end"] = load_average()
    return result


def run_memory(spec: dict) -> dict:
    """Peak memory of one pipeline, alone in this process (the reference with the stock SAM)."""
    import torch

    mode = spec["mode"]
    ctx = prepare(spec, fast_path=(mode != REFERENCE))
    head = ctx["head"]
    recorder = PhaseRecorder(ctx["sync"])
    reference = ReferencePipeline(head.sam.sam, head, recorder) if mode == REFERENCE else None
    fn = mode_callables(ctx, recorder, reference)[mode]
    result = {"kind": KIND_MEMORY, "mode": mode, "sam_fast_path": mode != REFERENCE, **ctx["info"]}
    mem = start_memory_measurement(ctx["info"]["device"])
    with torch.inference_mode():
        with recorder.run() as times:
            out = fn()
        del out
    result.update(finish_memory_measurement(ctx["info"]["device"], mem))
    result["run_ms"] = times[TOTAL] * 1000.0
    return result


def run_startup(spec: dict) -> dict:
    """Text embeddings of the LVIS vocabulary: cache hit vs encoding (see tools/benchmark.py)."""
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
    batch = cfg.MODEL.REGIONSPOT.VOCAB.BATCH_SIZE
    seed = cfg.MODEL.REGIONSPOT.FROZEN.SEED
    templates = te.PROMPT_TEMPLATES
    t0 = time.perf_counter()
    real = ClipDenseFeatures(build_clip(rs.CLIP.TYPE, "", True, seed + 1), rs.CLIP.INPUT_SIZE).to(device)
    real_build_s = time.perf_counter() - t0
    tiny = ClipDenseFeatures(build_clip("tiny", "", True, seed + 1), 64).to(device)
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
        "kind": KIND_STARTUP,
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
    r["load_average_at_end"] = load_average()
    return r


def run_throughput(spec: dict) -> dict:
    """
    Images per second of the model's evaluation forward (``model(batched_inputs)``, the call
    detectron2's ``inference_on_dataset`` makes) with B images per call, so that SAM's and CLIP's
    image encoders each run once per call on all B images. Every image is the benchmark image with
    the same N boxes as GT boxes (BOX_SOURCE "GT"); the model's postprocess materialises the kept
    detections' masks at image size, as an evaluator reads them.
    """
    import torch
    from detectron2.structures import Boxes, Instances

    ctx = prepare(spec, fast_path=True)
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

    result = {"kind": KIND_THROUGHPUT, **info, "repeats": spec["repeats"], "warmup": spec["warmup"], "batches": []}
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
    KIND_COMPARE: run_compare,
    KIND_MEMORY: run_memory,
    KIND_STARTUP: run_startup,
    KIND_THROUGHPUT: run_throughput,
}


def run_spec(spec: dict) -> dict:
    """The row of the job ``spec`` describes (``spec["kind"]`` picks the measurement)."""
    return WORKERS[spec["kind"]](spec)


def main(argv=None) -> int:
    import json

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m regionspot.benchmarking.workers SPEC_JSON OUT_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s %(name)s] %(message)s")
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    result = run_spec(spec)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
