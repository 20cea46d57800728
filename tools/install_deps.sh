#!/usr/bin/env bash
# Install RegionSpot and its dependencies into the Python given by $PYTHON (default: python3).
# An existing detectron2 installation is kept; otherwise the `sal-detectron2` repackaging of
# detectron2's official main (2024-04-17) is installed. Its only wheel is tagged for CPython
# 3.10 and holds pure-Python code plus a _C extension that other Pythons skip (RegionSpot does not
# need it), hence the cross-version install into site-packages.
set -euo pipefail
PY=${PYTHON:-python3}
pip() { "$PY" -m pip "$@"; }

pip install -q --upgrade "pip" "setuptools<81" wheel
# torch/torchvision first, as a matching pair (torchvision's compiled ops need their torch).
if ! "$PY" -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; then
  pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if "$PY" -c "import detectron2" >/dev/null 2>&1; then
  echo "detectron2 is already installed; keeping it."
else
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  pip install -q --no-deps --only-binary=:all: --python-version 3.10 --target "$site" "sal-detectron2==0.7.2"
  # detectron2's own runtime needs (the repackaging does not declare all of them).
  pip install -q "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" pycocotools omegaconf hydra-core \
    cloudpickle tabulate termcolor yacs matplotlib tensorboard Pillow tqdm packaging
fi
# ONNX export and the torch-free predictor (docs/DEPLOY.md): onnx (the format and its checker) and
# onnxruntime (the CPU runtime), both MIT-licensed prebuilt wheels (no compiler) from the ONNX project / Microsoft.
pip install -q "onnx>=1.16" "onnxruntime>=1.18"
pip install -q -e ".[test]" "setuptools<81"
# The other model families (docs/MODELS.md), each from its maintained package, none compiled or downloading:
# OpenCLIP (MetaCLIP, DFN, EVA02-CLIP via timm) and HQ-SAM (and the light HQ-SAM) are wheels; SAM 2.1 exists
# only as an sdist, built pure-python (no CUDA extension) against the installed torch. --no-deps: its pins
# (iopath>=0.1.10) clash with detectron2's fvcore; what it imports at run time (hydra-core, omegaconf,
# iopath, tqdm, Pillow, numpy) is installed above.
pip install -q "open-clip-torch==3.3.0" "segment-anything-hq==0.3"
if ! "$PY" -c "import sam2.build_sam" >/dev/null 2>&1; then
  SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation --no-deps "sam2==1.1.0"
fi
"$PY" -c "import regionspot, detectron2, torch; print('regionspot ready: torch', torch.__version__, '| detectron2', detectron2.__version__)"
