"""Shared fixtures: tiny SAM/CLIP with seeded random weights, on CPU unless a test names a device."""
import os

# Tiny models run fastest on one thread, and the subprocesses of the tests inherit this; without it
# they oversubscribe the cores when run beside each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402

import regionspot  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Devices of the device-parametrised tests: the CUDA cases run where a GPU is present and skip
# elsewhere (CI has none).
CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
)
DEVICES = ["cpu", CUDA]
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "Quickstart", "RegionSpot-tiny_shapes.yaml")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    # Text-embedding cache and generated datasets go to per-session temp dirs.
    monkeypatch.setenv("REGIONSPOT_CACHE", str(tmp_path_factory.getbasetemp() / "rs_cache"))


def tiny_cfg(*opts):
    """The built-in tiny config (random frozen models) with overrides."""
    cfg = get_cfg()
    regionspot.add_regionspot_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture
def cfg():
    return tiny_cfg()


@pytest.fixture(scope="session")
def photo():
    """A real photo shipped by scikit-image (RGB uint8), cropped for speed."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[80:280, 100:340])


@pytest.fixture(scope="session")
def predictor():
    torch.manual_seed(0)
    return regionspot.RegionSpotPredictor(tiny_cfg())
