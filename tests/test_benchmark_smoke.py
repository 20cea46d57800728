"""Smoke test of tools/benchmark.py with the tiny random-weight models (CPU; no timing assertions)."""
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(REPO_ROOT, "tools", "benchmark.py")

PHASES = (
    "sam_encoder",
    "clip",
    "prompt_decoding",
    "fusion_head",
    "mask_postprocess",
    "total",
    "eval_path_total",
)
NUM_BOXES = (0, 1, 3)


def test_benchmark_tiny_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [
        sys.executable, BENCHMARK,
        "--variants", "tiny",
        "--num-boxes", *[str(n) for n in NUM_BOXES],
        "--repeats", "1",
        "--warmup", "0",
        "--device", "cpu",
        "--cache-dir", str(tmp_path / "text_cache"),
        "--output-json", str(out_json),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"benchmark failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    # The report goes to stdout: machine description and one table row per (variant, N).
    assert "torch" in proc.stdout and "eval_path_total" in proc.stdout

    data = json.loads(out_json.read_text())
    for key in ("cpu_model", "cpu_count", "torch_num_threads", "torch_version", "device_name"):
        assert key in data["machine"], key
    results = data["results"]
    assert [r["num_boxes"] for r in results] == list(NUM_BOXES)
    for r in results:
        assert "error" not in r, r
        assert r["variant"] == "tiny"
        assert set(PHASES) <= set(r["phases_ms"]), r["phases_ms"].keys()
        for phase in PHASES:
            assert r["phases_ms"][phase] >= 0.0, (phase, r["phases_ms"][phase])
            assert len(r["phases_ms_runs"][phase]) == 1
        assert r["phases_ms"]["total"] > 0.0
        assert r["phases_ms"]["eval_path_total"] > 0.0
        assert r["build_s"] > 0.0
        assert 0.0 <= r["vocabulary_s"] <= r["build_s"]
        assert r["rss_after_build_mb"] > 0.0
        assert r["peak_rss_mb"] > 0.0
        assert "peak_rss_growth_mb" in r
        assert r["image_hw"][0] > 0 and r["image_hw"][1] > 0
