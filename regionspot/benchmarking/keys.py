"""
The one vocabulary of the benchmark: pipeline (mode) names, phase names and the fields of the JSON
rows. The timers, the reference pipeline, the JSON output, the markdown tables and the tests all use
these names (docs/BENCHMARKS.md's tables show them as columns: ``sam_encoder ms`` ...).
"""

# Pipelines compared on the same image, boxes and weights.
REFERENCE = "reference"
OURS_EVAL_MASKS = "ours_eval_masks"
OURS_PREDICTOR_MASKS = "ours_predictor_masks"
OURS_CLS_ONLY = "ours_cls_only"
MODES = (REFERENCE, OURS_EVAL_MASKS, OURS_PREDICTOR_MASKS, OURS_CLS_ONLY)
OURS_MODES = MODES[1:]
# Modes measured for memory, each in a subprocess of its own.
MEMORY_MODES = (REFERENCE, OURS_EVAL_MASKS, OURS_CLS_ONLY)
# Modes that produce a mask per region (the others report no mask_postprocess time).
MASK_MODES = (REFERENCE, OURS_EVAL_MASKS, OURS_PREDICTOR_MASKS)
MODE_DESCRIPTIONS = {
    REFERENCE: "stock SamPredictor + stock decoder on all N at once + full masks for all N + CLIP + fusion",
    OURS_EVAL_MASKS: "head.recognize (top-k, DETECTIONS_PER_IMAGE) + kept masks via to_bitmasks",
    OURS_PREDICTOR_MASKS: "RegionSpotPredictor.set_image + predict(boxes): masks for every region",
    OURS_CLS_ONLY: "RegionSpotPredictor.set_image + predict(boxes, return_masks=False)",
}

# Timed phases of one pipeline run, in pipeline order.
SAM_ENCODER = "sam_encoder"  # SAM preprocessing + image encoder
CLIP = "clip"  # CLIP image tensor + dense features
MASK_DECODER = "mask_decoder"  # prompt encoder + mask decoder (ours: head.sam.decode_prompts)
MASK_POSTPROCESS = "mask_postprocess"  # up-sampling of mask logits to image size + threshold
FUSION_HEAD = "fusion_head"  # fusion module + logits (+ softmax in the reference)
TIMED_PHASES = (SAM_ENCODER, CLIP, MASK_DECODER, MASK_POSTPROCESS, FUSION_HEAD)
# Derived: total minus the timed phases (ours: softmax, top-k selection, Instances), and the whole run.
OTHER = "other"
TOTAL = "total"
PHASES = TIMED_PHASES + (OTHER, TOTAL)
PHASE_DESCRIPTIONS = {
    SAM_ENCODER: "SAM preprocessing + image encoder",
    CLIP: "CLIP image tensor + dense features",
    MASK_DECODER: "prompt encoder + mask decoder (ours: head.sam.decode_prompts)",
    MASK_POSTPROCESS: "up-sampling of mask logits to image size + threshold",
    FUSION_HEAD: "fusion module + logits (+ softmax in the reference)",
    OTHER: "total minus the phases above (ours: softmax, top-k selection, Instances)",
    TOTAL: "the whole pipeline",
}

# Row kinds of the JSON output (one subprocess each) and the list of the payload they go to.
KIND_COMPARE = "compare"
KIND_MEMORY = "memory"
KIND_THROUGHPUT = "throughput"
KIND_STARTUP = "startup"
KINDS = (KIND_COMPARE, KIND_MEMORY, KIND_THROUGHPUT, KIND_STARTUP)
PAYLOAD_LISTS = {KIND_COMPARE: "results", KIND_MEMORY: "memory", KIND_THROUGHPUT: "throughput", KIND_STARTUP: "startup"}

# Fields of every mode's summary in a compare row (row["modes"][mode]).
MODE_FIELDS = ("description", "phases_ms", "phases_ms_runs", "speedup_vs_reference")
# Fields of a compare row (besides "modes"; "agreement" is None when the reference was skipped).
COMPARE_FIELDS = (
    "kind", "variant", "num_boxes", "precision", "device", "image", "image_hw", "num_classes",
    "torch_num_threads", "repeats", "warmup", "build_s", "vocabulary_s", "rss_after_build_mb",
    "peak_rss_mb", "peak_rss_growth_mb", "peak_rss_reset", "modes", "agreement",
)
# Fields of the agreement of a compare row (reference vs ours, last timed round).
AGREEMENT_FIELDS = (
    "precision", "logits_max_abs_diff", "logits_max_abs_diff_max", "logits_tolerance",
    "logits_within_tolerance", "top1_class_agreement_cls_only", "logits_abs_max_reference",
    "probs_max_abs_diff_cls_only", "mask_pixels_differing_fraction", "mask_pixels_differing",
    "mask_pixels_compared", "eval_num_detections",
)
# Fields of a memory row (one mode alone in a process).
MEMORY_FIELDS = (
    "kind", "mode", "variant", "num_boxes", "sam_fast_path", "rss_after_build_mb", "build_peak_rss_mb",
    "peak_rss_reset", "peak_rss_mb", "peak_rss_growth_mb", "run_ms",
)
# Fields of a throughput row and of each of its batches.
THROUGHPUT_FIELDS = ("kind", "variant", "num_boxes", "precision", "batches")
BATCH_FIELDS = ("images_per_call", "call_s_runs", "call_s", "images_per_s", "images_per_s_vs_first")
# Fields of the machine description (machine.machine_info).
MACHINE_FIELDS = (
    "cpu_model", "cpu_count", "cpu_matrix_features", "torch_num_threads", "torch_version", "python_version",
    "device", "device_name", "load_average_at_start",
)
