"""
The benchmark's output: the JSON payload of the rows, and the tables of docs/BENCHMARKS.md (markdown
with ``markdown=True``, plain text otherwise). Every name comes from :mod:`.keys`: the phase columns
are ``<phase> ms`` for the phases of :data:`keys.PHASES`.
"""
import collections
import json
import os

from .keys import (  # noqa: F401  (the vocabulary is re-exported: report.PHASES, report.MODES, ...)
    AGREEMENT_FIELDS,
    BATCH_FIELDS,
    COMPARE_FIELDS,
    KINDS,
    MACHINE_FIELDS,
    MEMORY_FIELDS,
    MEMORY_MODES,
    MODE_DESCRIPTIONS,
    MODE_FIELDS,
    MODES,
    OTHER,
    OURS_CLS_ONLY,
    OURS_EVAL_MASKS,
    OURS_PREDICTOR_MASKS,
    PAYLOAD_LISTS,
    PHASE_DESCRIPTIONS,
    PHASES,
    REFERENCE,
    THROUGHPUT_FIELDS,
    TIMED_PHASES,
    TOTAL,
)

# Columns of the tables (docs/BENCHMARKS.md shows them as they are here).
PHASE_TABLE_COLUMNS = (
    ["variant", "N", "precision", "mode"] + [f"{p} ms" for p in PHASES] + ["images/s", "speed-up"]
)
AGREEMENT_TABLE_COLUMNS = [
    "variant", "N", "precision", "logits max-abs-diff eval", "logits max-abs-diff predictor",
    "logits max-abs-diff cls-only", "< tol", "top-1 class agreement",
    "mask px differing (predictor)", "mask px differing (eval, kept)", "eval dets / mask regions",
    "build s (vocab s)", "compare-process peak MB",
]
THROUGHPUT_TABLE_COLUMNS = ["variant", "N", "precision", "images per call", "call s (median)", "images/s", "vs first"]


def memory_table_columns(gpu: bool = False):
    """Columns of the memory table (after-build and peaks in GPU MB on CUDA, RSS MB otherwise)."""
    unit = "GPU MB" if gpu else "RSS MB"
    columns = ["variant", "N", f"after build {unit}"]
    for mode in MEMORY_MODES:
        columns += [f"{mode} peak", f"{mode} growth"]
    return columns + ["growth ref / ours_eval"]


NOTES = f"""\
Modes: {REFERENCE} = SamPredictor-style pipeline with the stock segment_anything modules (stock encoder
attention; stock decoder on all N boxes in one call; full-resolution masks for all N); {OURS_EVAL_MASKS}
= head.recognize + the kept detections' masks at image size (what evaluation produces); {OURS_PREDICTOR_MASKS}
= RegionSpotPredictor.set_image + predict(boxes) (masks for every region); {OURS_CLS_ONLY} = predict(boxes,
return_masks=False). Speed-up = reference total / mode total. Same image, boxes and weights for all.
Phase '{OTHER}' = {TOTAL} - listed phases (ours: softmax, top-k selection, Instances). Agreement: max |logits
difference| vs the reference (fp32 tolerance {{tol:g}}); mask px differing = fraction of pixels where our mask
and the reference's mask of the same region differ."""


def fmt(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "nan"
    return f"{x:.{digits}f}"


def sci(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1e}"


def images_per_s(total_ms) -> str:
    return f"{1000.0 / total_ms:.3g}" if total_ms and total_ms > 0 else "-"


def table(rows, headers, markdown: bool) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=list(headers), tablefmt="github" if markdown else "simple", disable_numparse=True)


def phases_table(results, markdown: bool) -> str:
    """One row per (compare row, mode): the median ms of every phase, images/s and the speed-up."""
    headers = PHASE_TABLE_COLUMNS
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], r["num_boxes"], r.get("precision", "fp32"), "ERROR: " + r["error"]]
                        + [""] * (len(headers) - 4))
            continue
        for mode, m in r["modes"].items():
            ph = m["phases_ms"]
            speedup = "1.00x (ref)" if mode == REFERENCE else (
                f"{m['speedup_vs_reference']:.2f}x" if m.get("speedup_vs_reference") else "-")
            # The reference always runs in fp32.
            precision = "fp32" if mode == REFERENCE else r["precision"]
            rows.append([r["variant"], r["num_boxes"], precision, mode] + [fmt(ph.get(p)) for p in PHASES]
                        + [images_per_s(ph[TOTAL]), speedup])
    return table(rows, headers, markdown)


def agreement_table(results, markdown: bool) -> str:
    """One row per compare row: logits and mask agreement with the reference, build time, process peak."""
    headers = AGREEMENT_TABLE_COLUMNS
    rows = []
    for r in results:
        if "error" in r:
            continue
        a = r.get("agreement")
        build = f"{fmt(r['build_s'], 1)} ({fmt(r['vocabulary_s'], 1)})"
        if not a:
            rows.append([r["variant"], r["num_boxes"], r["precision"], "reference skipped"]
                        + [""] * (len(headers) - 6) + [build, fmt(r["peak_rss_mb"], 0)])
            continue
        d = a["logits_max_abs_diff"]
        frac = a["mask_pixels_differing_fraction"]
        within = a["logits_within_tolerance"]
        rows.append([
            r["variant"], r["num_boxes"], r["precision"], sci(d[OURS_EVAL_MASKS]), sci(d[OURS_PREDICTOR_MASKS]),
            sci(d[OURS_CLS_ONLY]), "n/a" if within is None else ("yes" if within else "NO"),
            f"{a['top1_class_agreement_cls_only'] * 100:.1f}%",
            f"{frac[OURS_PREDICTOR_MASKS]:.2e}", f"{frac[OURS_EVAL_MASKS]:.2e}" if OURS_EVAL_MASKS in frac else "-",
            f"{a['eval_num_detections']} / {a.get('eval_num_mask_regions', '-')}", build, fmt(r["peak_rss_mb"], 0),
        ])
    return table(rows, headers, markdown)


def memory_table(memory, markdown: bool) -> str:
    """One row per (variant, N): each memory mode's peak and growth, and the growth ratio reference / ours."""
    by_key = collections.OrderedDict()
    for m in memory:
        by_key.setdefault((m["variant"], m["num_boxes"]), {})[m["mode"]] = m
    gpu = any(str(m.get("device", "")).startswith("cuda") for m in memory)
    headers = memory_table_columns(gpu)
    rows = []
    for (variant, n), modes in by_key.items():
        base = next((m for m in modes.values() if "error" not in m), None)
        row = [variant, n, fmt(base.get("gpu_mem_after_build_mb" if gpu else "rss_after_build_mb"), 0) if base else "-"]
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
                row += [fmt(peak, 0), fmt(growth[mode], 0)]
        ratio = "-"
        if REFERENCE in growth and growth.get(OURS_EVAL_MASKS, 0) > 0:
            ratio = f"{growth[REFERENCE] / growth[OURS_EVAL_MASKS]:.1f}x"
        rows.append(row + [ratio])
    return table(rows, headers, markdown)


def throughput_table(throughput, markdown: bool) -> str:
    """One row per (throughput row, images per call)."""
    headers = THROUGHPUT_TABLE_COLUMNS
    rows = []
    for r in throughput:
        if "error" in r:
            rows.append([r["variant"], r["num_boxes"], r.get("precision", "fp32"), "ERROR: " + r["error"]]
                        + [""] * (len(headers) - 4))
            continue
        for b in r["batches"]:
            rows.append([r["variant"], r["num_boxes"], r["precision"], b["images_per_call"], fmt(b["call_s"], 3),
                         f"{b['images_per_s']:.3g}", f"{b['images_per_s_vs_first']:.2f}x"])
    return table(rows, headers, markdown)


def startup_text(startup, markdown: bool) -> str:
    """The start-up rows as a list, each figure marked measured / EXTRAPOLATED / DERIVED."""
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


def _matrix_text(features) -> str:
    if not features:
        return "n/a"
    present = [name for name, on in features.items() if on]
    return ", ".join(present) if present else "none of " + ", ".join(features)


def machine_text(info: dict, image_desc: str, warmup: int, repeats: int, num_classes: int, markdown: bool) -> str:
    """The machine and protocol lines heading the report."""
    device = info["device"]
    mem_kind = "GPU memory (torch.cuda.max_memory_allocated)" if device.startswith("cuda") else "process RSS (VmHWM)"
    lines = [
        ("CPU", f"{info['cpu_model']} ({info['cpu_count']} logical CPUs, usable {info.get('usable_cpus', '?')}, "
                f"torch threads {info['torch_num_threads']}; matrix units: {_matrix_text(info.get('cpu_matrix_features'))})"),
        ("Device", f"{device}: {info['device_name']}"),
        ("Software", f"torch {info['torch_version']}, detectron2 {info['detectron2_version']}, "
                     f"Python {info['python_version']}"),
        ("Load average", f"start {', '.join(str(x) for x in info.get('load_average_at_start', [])) or 'n/a'}; "
                         f"end {', '.join(str(x) for x in info.get('load_average_at_end', [])) or 'n/a'}"),
        ("Image", image_desc),
        ("Protocol", f"random weights; {warmup} warm-up + median of {repeats} run(s); "
                     f"{num_classes} classes; memory = {mem_kind}, one subprocess per mode"),
    ]
    if markdown:
        return "\n".join(f"- **{k}**: {v}" for k, v in lines)
    return "\n".join(f"{k + ':':<24}{v}" for k, v in lines)


def report_text(info: dict, collected: dict, image_desc: str, warmup: int, repeats: int, num_classes: int,
                logits_tol: float, markdown: bool) -> str:
    """The whole report: machine, then the tables of the kinds that have rows (``collected``: kind -> rows)."""
    colon = "\n" if markdown else ":"
    parts = [machine_text(info, image_desc, warmup, repeats, num_classes, markdown)]
    results = collected.get("compare", [])
    if results:
        parts += [NOTES.format(tol=logits_tol),
                  f"Latency per phase (median ms){colon}\n{phases_table(results, markdown)}",
                  f"Agreement with the reference (last timed round) and build{colon}\n"
                  f"{agreement_table(results, markdown)}"]
    if collected.get("memory"):
        parts.append("Peak memory per mode, one subprocess each (peak while running one pipeline; growth = peak - "
                     f"after build){colon}\n{memory_table(collected['memory'], markdown)}")
    if collected.get("throughput"):
        parts.append("Throughput of the evaluation forward, several images per call (frozen encoders batched)"
                     f"{colon}\n{throughput_table(collected['throughput'], markdown)}")
    if collected.get("startup"):
        parts.append(f"Start-up: text embeddings of the LVIS vocabulary{colon}\n{startup_text(collected['startup'], markdown)}")
    return "\n\n".join(parts)


def json_payload(info: dict, arguments: dict, image_desc: str, collected: dict) -> dict:
    """The JSON document: machine, arguments, the vocabulary (modes, phases) and the rows of every kind."""
    payload = {
        "machine": info,
        "arguments": arguments,
        "image": image_desc,
        "modes": {m: MODE_DESCRIPTIONS[m] for m in MODES},
        "phases": {p: PHASE_DESCRIPTIONS[p] for p in PHASES},
    }
    for kind in KINDS:
        payload[PAYLOAD_LISTS[kind]] = list(collected.get(kind, []))
    return payload


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
