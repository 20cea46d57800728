"""Evaluation sharded over 2 processes with detectron2's launch (gloo on CPU) equals 1 process."""
import json
import os
import subprocess
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg


def _eval(out_dir, weights, num_procs, env):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", TINY_CONFIG, "--eval-only",
           "--num-gpus", str(num_procs), "OUTPUT_DIR", str(out_dir), "MODEL.WEIGHTS", str(weights),
           "MODEL.REGIONSPOT.MASK.ENABLED", "False"]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    with open(os.path.join(out_dir, "inference", "regionspot_shapes_val", "coco_instances_results.json")) as f:
        return sorted((d["image_id"], d["category_id"], round(d["score"], 5), tuple(round(v, 2) for v in d["bbox"]))
                      for d in json.load(f))


def test_two_process_evaluation_equals_one(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    weights = tmp_path / "weights.pth"
    # CPU processes (gloo): on a machine with a GPU, launch would otherwise pick NCCL and want 2 GPUs.
    env = dict(os.environ, PYTHONWARNINGS="ignore", DETECTRON2_DATASETS=str(tmp_path / "datasets"),
               CUDA_VISIBLE_DEVICES="")
    one = _eval(tmp_path / "one", weights, 1, env)
    two = _eval(tmp_path / "two", weights, 2, env)
    assert len(one) > 0 and one == two
