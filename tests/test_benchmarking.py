"""Unit tests of regionspot.benchmarking: machine description, timers, tables, JSON and the reference pipeline."""
import json
import os
import re
import time

import numpy as np
import pytest
import torch

from regionspot.benchmarking import cpu_model, machine_info, matrix_features
from regionspot.benchmarking.inputs import build_cfg, random_boxes
from regionspot.benchmarking.keys import (
    CLIP,
    FUSION_HEAD,
    KINDS,
    MACHINE_FIELDS,
    MASK_DECODER,
    MEMORY_MODES,
    MODES,
    OTHER,
    OURS_CLS_ONLY,
    OURS_EVAL_MASKS,
    OURS_PREDICTOR_MASKS,
    PAYLOAD_LISTS,
    PHASES,
    REFERENCE,
    SAM_ENCODER,
    TIMED_PHASES,
    TOTAL,
)
from regionspot.benchmarking.reference import ReferencePipeline, agreement, build_reference_sam, pixel_disagreement
from regionspot.benchmarking.report import (
    AGREEMENT_TABLE_COLUMNS,
    PHASE_TABLE_COLUMNS,
    agreement_table,
    json_payload,
    memory_table,
    memory_table_columns,
    phases_table,
)
from regionspot.benchmarking.timing import PhaseRecorder, instrument, summarise_runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO_ROOT, "docs", "BENCHMARKS.md")


# ---------------------------------------------------------------------------------------------
# Machine
def test_cpu_model_is_a_name():
    name = cpu_model()
    assert isinstance(name, str) and name.strip() == name and name


def test_matrix_features_from_flags():
    features = matrix_features(["fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"])
    assert features["avx2"] and features["avx512f"] and features["amx_bf16"] and features["amx_tile"]
    assert not features["avx512_bf16"] and not features["amx_int8"] and not features["fma"]
    assert not any(matrix_features([]).values())
    # From this machine's flags: the same names, booleans.
    assert set(matrix_features()) == set(features)
    assert all(isinstance(v, bool) for v in matrix_features().values())


def test_machine_info_fields():
    info = machine_info("cpu")
    assert set(MACHINE_FIELDS) <= set(info), set(MACHINE_FIELDS) - set(info)
    assert info["cpu_model"] == cpu_model() == info["device_name"]
    assert info["torch_num_threads"] == torch.get_num_threads()
    json.dumps(info)  # JSON-serialisable


# ---------------------------------------------------------------------------------------------
# Timing
def test_phase_recorder_outermost_phase_only_and_other():
    recorder = PhaseRecorder()

    class Module:
        def work(self):
            time.sleep(0.01)
            return "out"

    module = Module()
    instrument(module, "work", recorder, FUSION_HEAD, capture="work")
    with recorder.run() as times:
        with recorder.phase(SAM_ENCODER):
            module.work()  # inside an open phase: counted in sam_encoder only
        module.work()  # on its own: fusion_head, and captured
        time.sleep(0.01)
    assert times[SAM_ENCODER] >= 0.01 and times[FUSION_HEAD] >= 0.01
    assert times[FUSION_HEAD] < times[SAM_ENCODER] + 0.01  # not double counted
    assert recorder.captured["work"] == "out"
    assert times[OTHER] >= 0.01
    assert times[TOTAL] == pytest.approx(sum(times[p] for p in TIMED_PHASES) + times[OTHER])
    # Outside a run the wrapper only calls through.
    assert module.work() == "out"


def test_summarise_runs_medians_in_ms():
    runs = [{SAM_ENCODER: 1.0, CLIP: 0.1, OTHER: 0.0, TOTAL: 1.1},
            {SAM_ENCODER: 3.0, CLIP: 0.3, OTHER: 0.0, TOTAL: 3.3},
            {SAM_ENCODER: 2.0, CLIP: 0.2, OTHER: 0.0, TOTAL: 2.2}]
    s = summarise_runs(runs)
    assert list(s["phases_ms"]) == [SAM_ENCODER, CLIP, OTHER, TOTAL]  # phases never entered are left out
    assert s["phases_ms"][SAM_ENCODER] == pytest.approx(2000.0)
    assert s["phases_ms_runs"][CLIP] == pytest.approx([100.0, 300.0, 200.0])


# ---------------------------------------------------------------------------------------------
# Report
def _compare_row(num_boxes=10, with_reference=True):
    modes = {}
    for i, mode in enumerate(MODES if with_reference else MODES[1:]):
        phases = {p: float(10 * (i + 1) + j) for j, p in enumerate(TIMED_PHASES)}
        if mode == OURS_CLS_ONLY:
            phases.pop("mask_postprocess")
        phases[OTHER] = 0.5
        phases[TOTAL] = sum(phases.values())
        modes[mode] = {"description": mode, "phases_ms": phases, "phases_ms_runs": {k: [v] for k, v in phases.items()},
                       "speedup_vs_reference": 1.0 + i if with_reference else None}
    row = {"kind": "compare", "variant": "BB", "num_boxes": num_boxes, "precision": "fp32", "modes": modes,
           "build_s": 1.5, "vocabulary_s": 0.2, "peak_rss_mb": 4758.0, "agreement": None}
    if with_reference:
        row["agreement"] = {
            "logits_max_abs_diff": {m: 7.7e-7 for m in MODES[1:]}, "logits_within_tolerance": True,
            "top1_class_agreement_cls_only": 1.0,
            "mask_pixels_differing_fraction": {OURS_PREDICTOR_MASKS: 0.0, OURS_EVAL_MASKS: 0.0},
            "eval_num_detections": 100, "eval_num_mask_regions": 10,
        }
    return row


def _documented_header(first_column_pattern: str):
    """The header cells of the docs/BENCHMARKS.md table whose header contains ``first_column_pattern``."""
    with open(BENCHMARKS_MD, encoding="utf-8") as f:
        for line in f:
            if line.startswith("|") and re.search(first_column_pattern, line):
                return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no table with {first_column_pattern!r} in docs/BENCHMARKS.md")


def _header(table_text: str):
    return [c.strip() for c in table_text.splitlines()[0].strip().strip("|").split("|")]


def test_phases_table_renders_the_documented_columns():
    text = phases_table([_compare_row()], markdown=True)
    header = _header(text)
    assert header == list(PHASE_TABLE_COLUMNS)
    assert [f"{p} ms" for p in PHASES] == [c for c in header if c.endswith(" ms")]
    assert header == _documented_header(r"\| sam_encoder ms")
    lines = text.splitlines()
    assert len(lines) == 2 + len(MODES)
    ref = [c.strip() for c in lines[2].strip().strip("|").split("|")]
    assert ref[:4] == ["BB", "10", "fp32", REFERENCE] and ref[-1] == "1.00x (ref)"
    cls_only = [c.strip() for c in lines[-1].strip().strip("|").split("|")]
    assert cls_only[3] == OURS_CLS_ONLY and cls_only[4 + PHASES.index("mask_postprocess")] == "-"
    assert cls_only[-1] == "4.00x"


def test_agreement_table_renders_the_documented_columns():
    text = agreement_table([_compare_row(), _compare_row(100, with_reference=False)], markdown=True)
    assert _header(text) == AGREEMENT_TABLE_COLUMNS == _documented_header(r"\| logits max-abs-diff eval")
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines()[2:]]
    assert rows[0][3:7] == ["7.7e-07", "7.7e-07", "7.7e-07", "yes"] and rows[0][-2:] == ["1.5 (0.2)", "4758"]
    assert rows[1][3] == "reference skipped" and len(rows[1]) == len(AGREEMENT_TABLE_COLUMNS)


def test_memory_table_renders_the_documented_columns():
    memory = [{"kind": "memory", "variant": "BB", "num_boxes": 10, "mode": mode, "device": "cpu",
               "rss_after_build_mb": 1800.0, "peak_rss_mb": 1800.0 + g, "peak_rss_growth_mb": g}
              for mode, g in zip(MEMORY_MODES, (2500.0, 500.0, 400.0))]
    text = memory_table(memory, markdown=True)
    assert _header(text) == memory_table_columns() == _documented_header(r"\| after build RSS MB")
    row = [c.strip() for c in text.splitlines()[2].strip().strip("|").split("|")]
    assert row == ["BB", "10", "1800", "4300", "2500", "2300", "500", "2200", "400", "5.0x"]


def test_json_payload_lists_every_kind_and_the_vocabulary():
    collected = {"compare": [_compare_row()], "memory": []}
    payload = json_payload({"cpu_model": "x"}, {"repeats": 1}, "image", collected)
    assert list(payload["phases"]) == list(PHASES) and list(payload["modes"]) == list(MODES)
    assert {PAYLOAD_LISTS[k] for k in KINDS} <= set(payload)
    assert payload["results"] == collected["compare"] and payload["throughput"] == []
    json.dumps(payload)


# ---------------------------------------------------------------------------------------------
# Reference pipeline
def test_pixel_disagreement():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = a.clone()
    b[0, 0, 0] = True
    assert pixel_disagreement(a, b) == (1 / 32, 1)
    assert pixel_disagreement(a[:0], b[:0]) == (0.0, 0)


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
    from regionspot import RegionSpotPredictor

    cfg = build_cfg("tiny", "cpu", str(tmp_path_factory.mktemp("text_cache")), ["cat", "dog", "cup", "car"])
    torch.manual_seed(0)
    predictor = RegionSpotPredictor(cfg)
    predictor.model.eval()
    return cfg, predictor


def test_reference_pipeline_equals_ours_on_the_tiny_models(tiny_predictor):
    cfg, predictor = tiny_predictor
    head = predictor.head
    rs = cfg.MODEL.REGIONSPOT
    image = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    boxes = random_boxes(5, 96, 128, seed=0)
    recorder = PhaseRecorder()
    reference = ReferencePipeline(build_reference_sam(head, rs.SAM.TYPE, cfg.MODEL.REGIONSPOT.FROZEN.SEED), head, recorder)
    with torch.inference_mode():
        with recorder.run() as times:
            ref = reference(image, boxes)
        predictor.set_image(image)
        ours = predictor.predict(torch.as_tensor(boxes))
    assert ref["logits"].shape == ours["logits"].shape == (5, 4)
    assert (ref["logits"] - ours["logits"]).abs().max().item() < 1e-4
    assert (ref["probs"] - ours["scores"]).abs().max().item() < 1e-4
    assert ref["masks"].shape == ours["masks"].shape == (5, 96, 128)
    assert pixel_disagreement(ref["masks"], ours["masks"])[0] <= 1e-3
    # Every phase of the reference was timed.
    assert all(times[p] > 0.0 for p in (SAM_ENCODER, CLIP, MASK_DECODER, FUSION_HEAD))


def test_reference_pipeline_refuses_the_fast_path_sam(tiny_predictor):
    _, predictor = tiny_predictor  # built with SAM.FAST_PATH True
    head = predictor.head
    with pytest.raises(ValueError, match="stock encoder attention"):
        ReferencePipeline(head.sam.sam, head)


def test_agreement_of_identical_outputs():
    logits = torch.randn(3, 4)
    masks = torch.rand(3, 8, 8) > 0.5
    probs = logits.softmax(-1)

    class NoDetections:
        def __len__(self):
            return 0

    outputs = {
        REFERENCE: {"logits": logits, "probs": probs, "masks": masks},
        OURS_EVAL_MASKS: {"logits": logits.clone(), "instances": NoDetections()},
        OURS_PREDICTOR_MASKS: {"logits": logits.clone(), "scores": probs, "masks": masks.clone()},
        OURS_CLS_ONLY: {"logits": logits.clone(), "scores": probs.clone()},
    }
    a = agreement(outputs, 3, 1e-4)
    assert a["logits_max_abs_diff_max"] == 0.0 and a["logits_within_tolerance"] is True
    assert a["top1_class_agreement_cls_only"] == 1.0
    assert a["mask_pixels_differing"][OURS_PREDICTOR_MASKS] == 0
    assert agreement(outputs, 3, 1e-4, precision="bf16")["logits_within_tolerance"] is None


def test_real_size_configs_allow_their_random_head():
    """The released-variant configs are measured with a seeded random head: allowed explicitly."""
    cfg = build_cfg("BB", "cpu", "/tmp/unused-cache", ["cat", "dog"])
    assert cfg.MODEL.REGIONSPOT.HEAD.ALLOW_RANDOM and cfg.MODEL.REGIONSPOT.FROZEN.RANDOM_INIT
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.REGIONSPOT.SAM.TYPE == "vit_b"
