#!/usr/bin/env python
"""
Latency, peak memory and numerical agreement of RegionSpot against a straightforward reference
pipeline written with the stock packages, at real size, with RANDOM weights.

No weight file is read: SAM and CLIP are built with seeded random weights
(``MODEL.REGIONSPOT.FROZEN.RANDOM_INIT True``), which have the architecture (and therefore the
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

These names (and the modes' and the JSON rows' fields) are defined once, in
``regionspot.benchmarking.keys``; the JSON rows, the tables and the tests use them. This script
only parses the arguments, plans one subprocess per job (``python -m regionspot.benchmarking.workers``)
and prints / writes the report; the measuring, the reference pipeline and the report live in
``regionspot.benchmarking`` (``timing``, ``reference``, ``workers``, ``report``, ``machine``).

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
frozen SAM and CLIP under autocast (``MODEL.REGIONSPOT.FROZEN.PRECISION``) and the reference always
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
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from regionspot.benchmarking import machine_info
from regionspot.benchmarking.inputs import DEFAULT_VOCABULARY, REPO_ROOT, VARIANT_CONFIGS, load_image
from regionspot.benchmarking.keys import (
    KIND_COMPARE, KIND_MEMORY, KIND_STARTUP, KIND_THROUGHPUT, KINDS, MEMORY_MODES, REFERENCE,
)
from regionspot.benchmarking.machine import load_average
from regionspot.benchmarking.report import json_payload, report_text, write_json
from regionspot.benchmarking.timing import mem_available_gib

logger = logging.getLogger("regionspot.benchmark")


def job_label(spec: dict) -> str:
    parts = [spec["kind"], spec["variant"]]
    if "num_boxes" in spec:
        parts.append(f"N={spec['num_boxes']}")
    if spec.get("precision", "fp32") != "fp32":
        parts.append(spec["precision"])
    if "mode" in spec:
        parts.append(spec["mode"])
    return " ".join(parts)


def run_job(spec: dict, timeout=None) -> dict:
    """One job in a fresh process (``python -m regionspot.benchmarking.workers``); its row, or an error row."""
    ident = {k: spec[k] for k in ("kind", "variant", "num_boxes", "mode", "precision") if k in spec}
    with tempfile.TemporaryDirectory(prefix="regionspot_bench_") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        out_path = os.path.join(tmp, "result.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-m", "regionspot.benchmarking.workers", spec_path, out_path]
        # The worker's stdout goes to our stderr: our stdout carries only the report.
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=sys.stderr, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {**ident, "error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not os.path.isfile(out_path):
            why = f"worker exited with code {proc.returncode}"
            if proc.returncode in (-9, 137):
                why += " (killed by SIGKILL: out of memory?)"
            return {**ident, "error": why + " (see its log above)"}
        with open(out_path, encoding="utf-8") as f:
            return json.load(f)


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
    args = p.parse_args(argv)
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


def plan_jobs(args, cache_dir: str):
    """The subprocess specs of the run, in order."""
    common = {
        "device": args.device, "image": args.image, "seed": args.seed, "vocabulary": list(args.vocabulary),
        "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "cache_dir": cache_dir,
        "skip_reference_above": args.skip_reference_above, "logits_tol": args.logits_tol,
    }
    jobs = []
    available = mem_available_gib()
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
            jobs += [{**common, "kind": KIND_COMPARE, "variant": variant, "num_boxes": n, "precision": precision}
                     for n in args.num_boxes for precision in args.precision]
        for n in memory_n:
            for mode in MEMORY_MODES:
                if mode == REFERENCE and n > args.skip_reference_above:
                    logger.info("memory %s N=%d: reference skipped (--skip-reference-above %d)",
                                variant, n, args.skip_reference_above)
                    continue
                jobs.append({**common, "kind": KIND_MEMORY, "variant": variant, "num_boxes": n, "mode": mode})
        if args.batch_images:
            jobs += [{**common, "kind": KIND_THROUGHPUT, "variant": variant, "num_boxes": n, "precision": precision,
                      "batch_images": list(args.batch_images)}
                     for n in args.num_boxes for precision in args.precision]
        if args.startup:
            jobs.append({**common, "kind": KIND_STARTUP, "variant": variant, "startup_classes": args.startup_classes})
    return jobs


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s %(name)s] %(message)s")

    info = machine_info(args.device)
    _, image_desc = load_image(args.image, args.seed)
    collected = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="regionspot_text_cache_") as default_cache:
        cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else default_cache
        jobs = plan_jobs(args, cache_dir)
        for i, spec in enumerate(jobs, 1):
            label = job_label(spec)
            logger.info("[%d/%d] %s (device %s)", i, len(jobs), label, args.device)
            t0 = time.perf_counter()
            r = run_job(spec, args.timeout)
            if "error" in r:
                logger.error("%s failed: %s", label, r["error"])
            else:
                logger.info("%s done in %.1f s", label, time.perf_counter() - t0)
            collected[spec["kind"]].append(r)
    info["load_average_at_end"] = load_average()

    rows = [r for kind in KINDS for r in collected[kind]]
    worker_threads = sorted({r["torch_num_threads"] for r in rows if "torch_num_threads" in r})
    if worker_threads:
        info["torch_num_threads"] = worker_threads[0] if len(worker_threads) == 1 else worker_threads
    print(report_text(info, collected, image_desc, args.warmup, args.repeats, len(args.vocabulary),
                      args.logits_tol, args.markdown))

    results = collected[KIND_COMPARE]
    disagreements = [r for r in results if r.get("agreement") and r["agreement"]["logits_within_tolerance"] is False]
    for r in disagreements:
        logger.error("%s N=%d: logits differ from the reference by %.3g (> %g)", r["variant"], r["num_boxes"],
                     r["agreement"]["logits_max_abs_diff_max"], args.logits_tol)
    if args.output_json:
        arguments = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json(args.output_json, json_payload(info, arguments, image_desc, collected))
        logger.info("Wrote %s", args.output_json)
    failed = any("error" in r for r in rows)
    return 1 if failed or disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
