#!/usr/bin/env python
"""
Precompute the CLIP text embeddings of a vocabulary into RegionSpot's on-disk cache, so that the model
(``train_net.py``, ``demo/demo.py``, ``RegionSpotPredictor``) encodes nothing when it starts::

    python tools/dump_text_embeddings.py --config-file configs/LVIS-Evaluation/RegionSpot-BB_lvis-val_gt-boxes.yaml \\
        --vocabulary lvis_v1_val
    python tools/dump_text_embeddings.py --config-file configs/Base-RegionSpot-BL.yaml \\
        --vocabulary custom --custom-vocabulary "cat,dog,sofa" --output sofa_vocab.pt

Only CLIP is built, from the config's ``MODEL.REGIONSPOT.CLIP.*`` exactly as the model builds it
(``FROZEN.RANDOM_INIT`` with seed ``FROZEN.SEED + 1``), so the cache entry is the one the model
reads: entries are keyed by the text tower's weights, the prompt templates and the class names in
order. The cache is ``MODEL.REGIONSPOT.VOCAB.CACHE_DIR`` (default ``$REGIONSPOT_CACHE`` or
``~/.cache/regionspot``).

``--vocabulary`` names a built-in list (``lvis``: LVIS v1 category names; ``coco``; ``objects365``:
Objects365 v1; ``custom``) or a registered detectron2 dataset, whose ``thing_classes`` are the
vocabulary the model uses when evaluating on it (``lvis_v1_val``'s differ from ``lvis`` in one name:
detectron2 calls category 'bull' 'horned_cow'). Without ``--vocabulary`` the config's own vocabulary
is used (``MODEL.REGIONSPOT.VOCAB.SOURCE`` / the first test dataset).

``--output`` also writes the [C, D] embeddings (rows in vocabulary order): ``.pt`` (a tensor) or
``.npy``.
"""
import argparse
import logging
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "Quickstart", "RegionSpot-tiny_shapes.yaml")

logger = logging.getLogger("regionspot.dump_text_embeddings")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="RegionSpot config (default: %(default)s)")
    p.add_argument(
        "--vocabulary", default=None, metavar="NAME",
        help="lvis | coco | objects365 | custom | a registered dataset name (default: the config's vocabulary)",
    )
    p.add_argument("--custom-vocabulary", default=None, metavar="NAMES", help='comma-separated names, e.g. "cat,dog,sofa"')
    p.add_argument("--output", default=None, metavar="FILE", help="also write the [C, D] embeddings here (.pt or .npy)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p


def resolve_vocabulary(args, cfg):
    """(class names, description of where they came from)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from regionspot.data.vocabularies import VOCABULARY_NAMES, get_vocabulary
    from regionspot.modeling.zero_shot_classifier import vocabulary_from_config

    name = args.vocabulary
    if name is None:
        if args.custom_vocabulary:
            return get_vocabulary("custom", args.custom_vocabulary), "custom"
        return vocabulary_from_config(cfg), "the config's vocabulary"
    if name.lower() in VOCABULARY_NAMES:
        if args.custom_vocabulary and name.lower() != "custom":
            raise SystemExit(f"--custom-vocabulary is only used with --vocabulary custom (got {name!r}).")
        return get_vocabulary(name, args.custom_vocabulary), name.lower()
    if name in DatasetCatalog.list() or name in MetadataCatalog.list():
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if not classes:
            raise SystemExit(f"Dataset {name!r} has no thing_classes in its metadata.")
        return list(classes), f"dataset {name}"
    raise SystemExit(
        f"--vocabulary {name!r}: not one of {', '.join(VOCABULARY_NAMES)} and not a registered dataset "
        "(e.g. lvis_v1_val, coco_2017_val, regionspot_shapes_val)."
    )


def main(argv=None):
    args = get_parser().parse_args(argv)

    import numpy as np
    import torch
    from detectron2.utils.logger import setup_logger

    from regionspot.config import get_regionspot_cfg
    from regionspot.modeling.clip_features import ClipDenseFeatures, build_clip
    from regionspot.modeling.text_embeddings import PROMPT_TEMPLATES, TextEmbeddingCache

    setup_logger(name="regionspot")
    if args.output and not args.output.endswith((".pt", ".npy")):
        raise SystemExit(f"--output {args.output!r}: use a .pt or .npy file name.")
    try:
        cfg = get_regionspot_cfg(args.config_file, args.opts)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    cfg.freeze()
    rs = cfg.MODEL.REGIONSPOT

    names, source = resolve_vocabulary(args, cfg)
    names = [str(n) for n in names]
    logger.info(f"Vocabulary: {source}, {len(names)} classes; CLIP {rs.CLIP.TYPE} ({rs.CLIP.WEIGHTS or 'random weights'})")
    if rs.FROZEN.RANDOM_INIT:
        logger.warning(
            "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT is on: CLIP has random stand-in weights (the embeddings are "
            "only good for tests)."
        )

    start = time.perf_counter()
    # Same construction (and seed) as RegionSpotROIHeads.from_config, so the cache key matches.
    clip = ClipDenseFeatures(
        build_clip(rs.CLIP.TYPE, rs.CLIP.WEIGHTS, rs.FROZEN.RANDOM_INIT, rs.FROZEN.SEED + 1),
        rs.CLIP.INPUT_SIZE,
    )
    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE={device!r} but CUDA is not available: encoding on the CPU.")
        device = "cpu"
    clip.to(device)
    cache = TextEmbeddingCache(rs.VOCAB.CACHE_DIR or None)
    path = cache.path(cache.key(clip, names, PROMPT_TEMPLATES))
    before = os.path.getmtime(path) if os.path.isfile(path) else None
    with torch.no_grad():
        embeddings = cache.get(clip, names, PROMPT_TEMPLATES, batch_size=rs.VOCAB.BATCH_SIZE)
    elapsed = time.perf_counter() - start
    hit = before is not None and os.path.isfile(path) and os.path.getmtime(path) == before

    embeddings = embeddings.float().cpu()
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        if args.output.endswith(".npy"):
            np.save(args.output, embeddings.numpy())
        else:
            torch.save(embeddings, args.output)
        logger.info(f"Wrote {args.output}")
    print(f"cache file: {path} ({'already cached' if hit else 'written'})")
    print(f"embeddings: {list(embeddings.shape)} ({len(names)} classes x {embeddings.shape[1]} dims)")
    print(f"time: {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
