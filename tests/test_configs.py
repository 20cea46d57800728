"""Every shipped config parses; the tiny one builds the registered parts."""
import glob
import os

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import regionspot
from conftest import REPO_ROOT, TINY_CONFIG as TINY_CONFIG_PATH, tiny_cfg

CONFIGS = sorted(
    glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True)
    + glob.glob(os.path.join(REPO_ROOT, "projects", "**", "*.yaml"), recursive=True)
)


def test_configs_are_grouped_by_task():
    """Bases at the top of configs/, recipes in task folders (as detectron2's projects lay them out)."""
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*.yaml")))
    assert top and all(name.startswith("Base-") for name in top), top
    assert not glob.glob(os.path.join(REPO_ROOT, "projects", "RegionSpot", "*.yaml"))
    for folder in ("LVIS-Evaluation", "Training", "ODinW", "Quickstart"):
        assert glob.glob(os.path.join(REPO_ROOT, "configs", folder, "*.yaml")), folder
    assert len(CONFIGS) >= 38


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO_ROOT) for p in CONFIGS])
def test_config_parses(path):
    cfg = get_cfg()
    regionspot.add_regionspot_config(cfg)
    cfg.merge_from_file(path)
    if not os.path.basename(path).startswith("Base-"):
        assert cfg.MODEL.META_ARCHITECTURE and cfg.MODEL.ROI_HEADS.NAME == "RegionSpotROIHeads"


def test_every_key_is_documented():
    src = open(os.path.join(REPO_ROOT, "regionspot", "config.py")).read().splitlines()
    for i, line in enumerate(src):
        stripped = line.strip()
        if stripped.startswith("rs.") and "=" in stripped and "CN()" not in stripped:
            above = src[i - 1].strip()
            assert above.startswith("#") or src[i - 1].strip().startswith("rs."), f"undocumented key: {stripped}"


def test_tiny_model_builds_registered_parts():
    model = build_model(tiny_cfg())
    assert type(model).__name__ == "RegionSpot" and type(model.roi_heads).__name__ == "RegionSpotROIHeads"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("roi_heads.fusion.") for n in trainable)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="BOX_SOURCE"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.BOX_SOURCE", "BOXES"))
    with pytest.raises(ValueError, match="LOAD_PROPOSALS"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.BOX_SOURCE", "PROPOSALS"))
    with pytest.raises(ValueError, match=r"SCORE\.MODE"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.SCORE.MODE", "max"))
    with pytest.raises(ValueError, match=r"VOCAB\.CUSTOM is empty"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.VOCAB.SOURCE", "custom"))


def test_missing_config_file_is_named(tmp_path):
    from regionspot.config import get_regionspot_cfg

    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_regionspot_cfg(str(tmp_path / "nope.yaml"))
    assert get_regionspot_cfg(TINY_CONFIG_PATH, ["SOLVER.MAX_ITER", "7"]).SOLVER.MAX_ITER == 7


def test_renamed_keys_are_read_under_their_new_names(tmp_path, caplog):
    """Old top-level MODEL.REGIONSPOT keys: read as the new ones by get_regionspot_cfg, named in a message."""
    from regionspot.config import RENAMED_KEYS, get_regionspot_cfg

    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text(
        f'_BASE_: "{TINY_CONFIG_PATH}"\nMODEL:\n  REGIONSPOT:\n    TEXT_CACHE_DIR: "/tmp/old-name"\n    FOCAL_GAMMA: 3.0\n'
    )
    with caplog.at_level("WARNING"):
        cfg = get_regionspot_cfg(str(old_yaml), ["MODEL.REGIONSPOT.MASK_ON", "False", "MODEL.REGIONSPOT.SCORING", "per_region"])
    rs = cfg.MODEL.REGIONSPOT
    assert (rs.VOCAB.CACHE_DIR, rs.LOSS.FOCAL_GAMMA, rs.MASK.ENABLED, rs.SCORE.MODE) == ("/tmp/old-name", 3.0, False, "per_region")
    assert rs.SCORE.TOPK == 100 and rs.FROZEN.RANDOM_INIT  # the tiny config's values, under the new names
    assert "MODEL.REGIONSPOT.MASK_ON is now MODEL.REGIONSPOT.MASK.ENABLED" in caplog.text
    for old, (node, key) in RENAMED_KEYS.items():
        assert old not in rs and key in rs[node], old
    # detectron2's own merge refuses an old name with a message naming the new one.
    plain = regionspot.add_regionspot_config(get_cfg())
    with pytest.raises(KeyError, match=r"MODEL\.REGIONSPOT\.TOPK was renamed to MODEL\.REGIONSPOT\.SCORE\.TOPK"):
        plain.merge_from_list(["MODEL.REGIONSPOT.TOPK", 5])
