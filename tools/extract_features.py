#!/usr/bin/env python
"""
Extract the frozen models' features of training datasets into a feature cache, so that training
(``train_net.py`` with ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR``) never runs SAM or CLIP::

    python tools/extract_features.py --config-file configs/Training/RegionSpot-BB_stage1_objects365.yaml \\
        --output feature_cache/bb_o365 --views identity,hflip
    # then
    python train_net.py --config-file configs/Training/RegionSpot-BB_stage1_objects365.yaml \\
        MODEL.REGIONSPOT.FEATURE_CACHE.DIR feature_cache/bb_o365

The command line of :mod:`regionspot.engine.feature_extraction` (views, resuming, unreadable images,
sharding over processes: see ``--help``).
"""
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from regionspot.engine.feature_extraction import main  # noqa: E402

if __name__ == "__main__":
    main()
