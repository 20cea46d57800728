#!/usr/bin/env python
"""RegionSpot for detectron2. detectron2 itself is not declared: an existing build is kept as it is
(see the README for installing one)."""
from setuptools import find_packages, setup

setup(
    name="regionspot",
    version="0.1.0",
    description="RegionSpot (Recognize Any Regions) as a detectron2 extension",
    packages=find_packages(include=["regionspot", "regionspot.*"]),
    package_data={"regionspot.modeling": ["open_clip_configs/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "segment-anything==1.0",
        "clip-anytorch>=2.6.0",
        "lvis==0.5.3",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "opencv-python",
        "numpy",
        "tqdm",
        # regionspot.export: ONNX export and the torch-free OnnxRegionSpotPredictor (docs/DEPLOY.md).
        "onnx>=1.16",
        "onnxruntime>=1.18",
        # clip and detectron2's model_zoo import pkg_resources, gone from setuptools >= 81.
        "setuptools<81",
    ],
    extras_require={"test": ["pytest", "scikit-image", "imgviz==2.1.0"]},
)
