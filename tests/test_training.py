"""Training: the loss, what trains and what stays frozen, learning on the built-in data, resume."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from fvcore.nn import sigmoid_focal_loss

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg
from hooks import RecordLoss
from regionspot.engine import Trainer


def test_focal_loss_normalisation(monkeypatch):
    model = build_model(tiny_cfg())
    head = model.roi_heads
    c = head.num_classes
    torch.manual_seed(0)
    fixed = torch.randn(3, 4, c)  # 3 images padded to 4 regions
    monkeypatch.setattr(head.classifier, "forward", lambda emb, vocabulary=None: fixed[:, : emb.shape[1]])
    tokens = [torch.randn(4, head.sam.token_dim), torch.randn(0, head.sam.token_dim), torch.randn(2, head.sam.token_dim)]
    labels = [torch.tensor([0, 1, 2, 5]), torch.zeros(0, dtype=torch.long), torch.tensor([3, 3])]
    feats = torch.randn(3, head.clip.num_tokens, head.clip.width)
    loss = head.loss_from_tokens(tokens, feats, labels)

    def per_image(logits, y):
        onehot = torch.nn.functional.one_hot(y, c).float()
        return sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="none").sum(1).mean()

    expected = per_image(fixed[0, :4], labels[0]) + per_image(fixed[2, :2], labels[2])  # empty image adds 0
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(head.loss_from_tokens([tokens[1]], feats[:1], [labels[1]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        head.loss_from_tokens([tokens[2]], feats[:1], [torch.tensor([0, c])])


def test_images_without_boxes_train(photo):
    model = build_model(tiny_cfg())
    model.train()
    image = torch.as_tensor(photo).permute(2, 0, 1).float()
    empty = Instances(photo.shape[:2], gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    losses = model([{"image": image, "instances": empty}])
    assert losses["loss_region_cls"].item() == 0.0
    losses["loss_region_cls"].backward()  # still connected to the graph


def test_only_the_fusion_module_learns_and_loss_decreases(tmp_path):
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", 40, "SOLVER.IMS_PER_BATCH", 4,
                   "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()")
    trainer = Trainer(cfg)
    model = trainer.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("roi_heads.fusion.")}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("roi_heads.fusion.")}
    assert frozen and trainable
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in trainable}

    losses = []
    trainer.register_hooks([RecordLoss(losses)])
    trainer.train()
    assert not model.roi_heads.sam.training and not model.roi_heads.clip.training
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses


def _train_cmd(out_dir, max_iter, resume=False):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", TINY_CONFIG]
    if resume:
        cmd.append("--resume")
    return cmd + ["OUTPUT_DIR", str(out_dir), "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "5",
                  "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()", "SOLVER.STEPS", "(8,)", "SOLVER.WARMUP_ITERS", "0"]


def test_resume_after_kill(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(_train_cmd(tmp_path, 100000), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "last_checkpoint"
    deadline = time.time() + 240
    while not (marker.exists() and marker.read_text().strip() != "model_0000004.pth"):
        assert proc.poll() is None, "training died"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-training, possibly while writing the next checkpoint
    proc.wait()
    last = marker.read_text().strip()
    saved = torch.load(tmp_path / last, map_location="cpu", weights_only=False)
    k = saved["iteration"]
    assert k >= 9 and (k + 1) % 5 == 0
    assert "optimizer" in saved["trainer"]["_trainer"] and "LRScheduler" in saved["trainer"]["hooks"]

    max_iter = k + 1 + 5
    resumed = subprocess.run(_train_cmd(tmp_path, max_iter, resume=True), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Loading from" in log and last in log
    assert marker.read_text().strip() == "model_final.pth"
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == max_iter - 1
    # AdamW's step count continues from the checkpoint: k + 1 steps before the kill, 5 after.
    state = next(iter(final["trainer"]["_trainer"]["optimizer"]["state"].values()))
    assert int(state["step"]) == max_iter
    # The LR schedule continued too.
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == max_iter
