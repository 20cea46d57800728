"""
Smoke test of tools/benchmark.py with the tiny random-weight models (CPU; no timing assertions): the rows
carry the documented keys (regionspot.benchmarking.keys) and our logits agree with the reference's.
"""
import json
import os
import subprocess
import sys

from regionspot.benchmarking.keys import (
    AGREEMENT_FIELDS,
    BATCH_FIELDS,
    COMPARE_FIELDS,
    MACHINE_FIELDS,
    MASK_MODES,
    MASK_POSTPROCESS,
    MEMORY_FIELDS,
    MEMORY_MODES,
    MODE_FIELDS,
    MODES,
    OURS_EVAL_MASKS,
    OURS_MODES,
    OURS_PREDICTOR_MASKS,
    PHASES,
    REFERENCE,
    THROUGHPUT_FIELDS,
    TOTAL,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(REPO_ROOT, "tools", "benchmark.py")

NUM_BOXES = (0, 1, 3)
MEMORY_N = (3,)
LOGITS_TOL = 1e-4


def _run_benchmark(tmp_path, *args):
    """tools/benchmark.py on the tiny models, one timed round, one thread; returns (process, JSON output)."""
    out_json = tmp_path / "bench.json"
    cmd = [
        sys.executable, BENCHMARK, "--variants", "tiny", *args, "--repeats", "1", "--warmup", "0", "--threads", "1",
        "--cache-dir", str(tmp_path / "text_cache"), "--output-json", str(out_json),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"benchmark failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out_json.read_text())


def test_benchmark_tiny_smoke(tmp_path):
    proc, data = _run_benchmark(
        tmp_path,
        "--num-boxes", *[str(n) for n in NUM_BOXES],
        # Per-mode memory subprocesses only for --memory-n (keeps the test short).
        "--no-memory",
        "--memory-n", *[str(n) for n in MEMORY_N],
        "--device", "cpu",
    )
    # The report goes to stdout: machine description, then the phase, agreement and memory tables.
    assert "torch" in proc.stdout and "Load average" in proc.stdout
    for mode in MODES:
        assert mode in proc.stdout, mode
    assert "speed-up" in proc.stdout and "logits max-abs-diff" in proc.stdout and "peak" in proc.stdout

    assert set(MACHINE_FIELDS) <= set(data["machine"]), data["machine"].keys()
    assert data["machine"]["torch_num_threads"] == 1
    assert list(data["phases"]) == list(PHASES)
    assert list(data["modes"]) == list(MODES)

    results = data["results"]
    assert [r["num_boxes"] for r in results] == list(NUM_BOXES)
    for r in results:
        assert "error" not in r, r
        assert set(COMPARE_FIELDS) <= set(r), set(COMPARE_FIELDS) - set(r)
        assert r["variant"] == "tiny"
        assert r["kind"] == "compare"
        assert r["reference_weights_identical"] is True
        # Per-mode entries: every phase of the vocabulary (mask_postprocess only for modes with masks).
        assert set(r["modes"]) == set(MODES), r["modes"].keys()
        for mode in MODES:
            m = r["modes"][mode]
            assert set(MODE_FIELDS) <= set(m), (mode, m.keys())
            expected = set(PHASES) - ({MASK_POSTPROCESS} if mode not in MASK_MODES else set())
            assert expected <= set(m["phases_ms"]) <= set(PHASES), (mode, m["phases_ms"].keys())
            assert set(m["phases_ms_runs"]) == set(m["phases_ms"])
            for phase, ms in m["phases_ms"].items():
                assert ms >= 0.0, (mode, phase, ms)
                assert len(m["phases_ms_runs"][phase]) == 1
            assert m["phases_ms"][TOTAL] > 0.0
            assert m["speedup_vs_reference"] > 0.0
        # Agreement with the reference: logits to 1e-4 in fp32, masks compared pixel by pixel.
        a = r["agreement"]
        assert set(AGREEMENT_FIELDS) <= set(a), set(AGREEMENT_FIELDS) - set(a)
        assert a["logits_tolerance"] == LOGITS_TOL
        assert set(a["logits_max_abs_diff"]) == set(OURS_MODES)
        for mode in OURS_MODES:
            assert a["logits_max_abs_diff"][mode] < LOGITS_TOL, (mode, a["logits_max_abs_diff"])
        assert a["logits_max_abs_diff_max"] < LOGITS_TOL
        assert a["logits_within_tolerance"] is True
        for mode in (OURS_PREDICTOR_MASKS, OURS_EVAL_MASKS):
            assert 0.0 <= a["mask_pixels_differing_fraction"][mode] <= 1e-3, (mode, a["mask_pixels_differing_fraction"])
        assert a["mask_pixels_compared"][OURS_PREDICTOR_MASKS] == r["num_boxes"] * r["image_hw"][0] * r["image_hw"][1]
        assert a["eval_num_detections"] <= r["num_boxes"] * r["num_classes"]

        assert r["build_s"] > 0.0
        assert 0.0 <= r["vocabulary_s"] <= r["build_s"]
        assert r["rss_after_build_mb"] > 0.0
        assert r["peak_rss_mb"] > 0.0
        assert r["image_hw"][0] > 0 and r["image_hw"][1] > 0

    # Memory: one subprocess per (N, mode); the reference one runs the stock SAM.
    memory = data["memory"]
    assert sorted((m["num_boxes"], m["mode"]) for m in memory) == sorted(
        (n, mode) for n in MEMORY_N for mode in MEMORY_MODES
    )
    for m in memory:
        assert "error" not in m, m
        assert set(MEMORY_FIELDS) <= set(m), set(MEMORY_FIELDS) - set(m)
        assert m["kind"] == "memory"
        assert m["sam_fast_path"] is (m["mode"] != REFERENCE)
        assert m["rss_after_build_mb"] > 0.0
        assert m["peak_rss_mb"] > 0.0
        assert m["run_ms"] > 0.0


def test_benchmark_skip_reference_above(tmp_path):
    """Above --skip-reference-above only ours runs; no agreement, no reference memory job."""
    _, data = _run_benchmark(tmp_path, "--num-boxes", "2", "--no-memory", "--memory-n", "2", "--skip-reference-above", "1")
    (r,) = data["results"]
    assert "error" not in r, r
    assert set(r["modes"]) == set(OURS_MODES)
    assert r["agreement"] is None
    assert "reference_skipped" in r
    assert sorted(m["mode"] for m in data["memory"]) == sorted(m for m in MEMORY_MODES if m != REFERENCE)


def test_benchmark_reduced_precision_and_throughput(tmp_path):
    """
    --precision bf16: ours under autocast against the fp32 reference (differences reported, not held to
    the fp32 tolerance); --batch-images: images/s of the evaluation forward with 1 and 2 images per call.
    """
    proc, data = _run_benchmark(tmp_path, "--num-boxes", "3", "--precision", "bf16", "--batch-images", "1", "2",
                                "--no-memory")
    assert "images/s" in proc.stdout and "top-1 class agreement" in proc.stdout

    (r,) = data["results"]
    assert "error" not in r, r
    assert r["precision"] == "bf16"
    a = r["agreement"]
    assert a["precision"] == "bf16"
    assert a["logits_within_tolerance"] is None  # the fp32 tolerance is not applied to bf16
    diff = a["logits_max_abs_diff_max"]
    # bf16 has an 8-bit mantissa: the logits differ, but stay of the order of its rounding.
    assert 0.0 < diff < 0.05 * max(1.0, a["logits_abs_max_reference"]), a
    assert 0.0 <= a["top1_class_agreement_cls_only"] <= 1.0

    (t,) = data["throughput"]
    assert "error" not in t, t
    assert set(THROUGHPUT_FIELDS) <= set(t), t.keys()
    assert t["kind"] == "throughput" and t["precision"] == "bf16" and t["num_boxes"] == 3
    assert [b["images_per_call"] for b in t["batches"]] == [1, 2]
    for b in t["batches"]:
        assert set(BATCH_FIELDS) <= set(b), b.keys()
        assert b["call_s"] > 0.0
        assert abs(b["images_per_s"] - b["images_per_call"] / b["call_s"]) < 1e-9
    assert t["batches"][0]["images_per_s_vs_first"] == 1.0


def test_benchmark_bad_arguments():
    for bad in (["--batch-images", "0"], ["--precision", "int8"]):
        proc = subprocess.run([sys.executable, BENCHMARK, *bad], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert bad[0] in proc.stderr, proc.stderr


def test_precision_benchmark_tiny_smoke(tmp_path):
    """tools/benchmark_precision.py on the tiny models: both precisions timed, agreement and GFLOP/s reported."""
    out = tmp_path / "precision.json"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "benchmark_precision.py"), "--variants", "tiny",
           "--num-boxes", "5", "--classes", "5", "--repeats", "1", "--warmup", "0",
           "--cache-dir", str(tmp_path / "cache"), "--output-json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["matmul_gflops"]["fp32"] > 0 and data["matmul_gflops"]["bf16"] > 0
    tiny = data["variants"]["tiny"]
    for precision in ("fp32", "bf16"):
        assert all(tiny["median_s"][precision][k] > 0 for k in ("sam_encoder", "mask_decoder", "clip", "total"))
    agreement = tiny["agreement_bf16_vs_fp32"]
    assert 0.0 < agreement["logits_max_abs_diff"] < 0.5  # bf16 differs from fp32, within its rounding
    assert 0.0 <= agreement["kept_detection_overlap"] <= 1.0 and agreement["kept_detections"][0] > 0
    assert "| tiny | speed-up |" in proc.stdout
