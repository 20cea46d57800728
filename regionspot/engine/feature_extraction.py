"""
Extraction of the frozen models' features of training datasets into a feature cache, so that
training (``train_net.py`` with ``MODEL.REGIONSPOT.FEATURE_CACHE.DIR``) never runs SAM or CLIP.
``tools/extract_features.py`` is its command line (:func:`main`)::

    python tools/extract_features.py --config-file configs/Training/RegionSpot-BB_stage1_objects365.yaml \\
        --output feature_cache/bb_o365 --views identity,hflip
    # then
    python train_net.py --config-file configs/Training/RegionSpot-BB_stage1_objects365.yaml \\
        MODEL.REGIONSPOT.FEATURE_CACHE.DIR feature_cache/bb_o365

For every image of the datasets (default: all of ``DATASETS.TRAIN``) and every view (``--views``:
``identity``, ``hflip``, ``short<S>[max<M>][_hflip]``, see ``regionspot.data.feature_cache.get_view``)
the view's deterministic transform is applied to the image and its boxes together (as the online
training mapper does), SAM's image encoder and CLIP run ONCE on the transformed image, and SAM's
prompt decoder turns the transformed GT boxes into region tokens. Tokens and the CLIP feature map are
stored in fp16, one file per image and view (see ``regionspot/data/feature_cache.py``).

The run is resumable: images whose files exist and verify (checksum, annotations) are skipped, so
re-running after an interruption, or with more views, only computes what is missing. The manifest is
written first; a directory made with other settings (other SAM/CLIP weights, CLIP INPUT_SIZE, seed,
view definitions, dataset size) is refused: use a new ``--output``.

An image that cannot be read (missing, empty, not an image, truncated or corrupt; see
``regionspot.data.images``) is skipped with one warning naming it, and the run goes on; the summary
counts and lists them (``--strict`` makes the first one an error). A skipped image has no record, and
the manifest still counts it, so training from the cache refuses it as incomplete ("has 5 of 6
images"): it never trains silently without the image. Replace the file and run the extraction again
with the same ``--output`` (only the missing records are computed), or remove the image from the
dataset and extract into a new ``--output`` (the number of images is part of the manifest).

Parallel extraction: ``--num-shards K --shard-index i`` (independent processes, e.g. one per GPU or
machine, each takes the images i, i+K, ...), or ``--num-gpus N`` (detectron2's ``launch``: N local
processes, NCCL on GPUs, gloo on the CPU, each taking its share of the shard). For CPU processes on a
machine that has a GPU, hide it (``CUDA_VISIBLE_DEVICES=""``): ``launch`` otherwise wants N GPUs.
"""

import argparse
import logging
import os
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import get_regionspot_cfg
from ..data.feature_cache import FeatureCache, annotations_digest, get_view, view_annotations
from ..data.images import ImageReadError, read_image
from ..data.user_datasets import add_dataset_arguments, register_coco_datasets
from .fingerprints import build_frozen_head, settings_from_cfg

__all__ = ["extract_image", "get_parser", "main", "run"]

# The repository's tiny config (random frozen models), the default of --config-file.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "Quickstart", "RegionSpot-tiny_shapes.yaml",
)

logger = logging.getLogger("regionspot.extract_features")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="RegionSpot config (default: %(default)s)")
    p.add_argument(
        "--dataset", action="append", default=None, metavar="NAME",
        help="registered dataset to extract (repeat or comma-separate; default: all of DATASETS.TRAIN)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="feature-cache directory (created or resumed)")
    p.add_argument("--views", default="identity,hflip", help="comma-separated views (default: %(default)s)")
    p.add_argument("--num-shards", type=int, default=1, help="split the images into K shards (default: 1)")
    p.add_argument("--shard-index", type=int, default=0, help="the shard this process extracts, 0..K-1")
    p.add_argument("--num-gpus", type=int, default=1, help="local processes via detectron2's launch (default: 1)")
    p.add_argument("--dist-url", default="auto", help="init URL of --num-gpus > 1 (default: %(default)s)")
    p.add_argument(
        "--no-verify-existing", action="store_true",
        help="resume by file existence only (faster on huge caches; corrupt files are then not rewritten)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--strict", action="store_true",
        help="stop at the first unreadable image (default: skip it with a warning; the cache is then incomplete)",
    )
    add_dataset_arguments(p)  # --coco-dataset NAME JSON IMAGE_ROOT, for your own data in DATASETS.TRAIN
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p


def setup_cfg(args):
    try:
        cfg = get_regionspot_cfg(args.config_file, args.opts)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    cfg.freeze()
    return cfg


def _dataset_names(args, cfg):
    names = []
    for entry in args.dataset or []:
        names += [n.strip() for n in entry.split(",") if n.strip()]
    names = names or list(cfg.DATASETS.TRAIN)
    if not names:
        raise SystemExit("No dataset: give --dataset or set DATASETS.TRAIN.")
    return list(dict.fromkeys(names))


def _load_dicts(name):
    if name not in DatasetCatalog.list():
        raise SystemExit(f"Dataset {name!r} is not registered in detectron2's DatasetCatalog.")
    dicts = DatasetCatalog.get(name)
    seen = set()
    for i, d in enumerate(dicts):
        if "image_id" not in d:
            raise SystemExit(f"Dict {i} of dataset {name!r} has no 'image_id': the feature cache is keyed by it.")
        if d["image_id"] in seen:
            raise SystemExit(f"Dataset {name!r} has image_id {d['image_id']!r} twice: the feature cache needs unique ids.")
        seen.add(d["image_id"])
    return dicts


def extract_image(head, dataset_dict, views, chunk_size):
    """
    Features of one image in each of ``views``: yields (view, record fields) with fp32 tensors.
    The image is read once (RGB) and each view transforms it and its boxes together.

    Raises:
        ImageReadError: the image file cannot be read (nothing yielded).
    """
    # Raises ImageReadError before the first record is yielded, so a bad image leaves no partial record.
    image = read_image(dataset_dict["file_name"], format="RGB")
    utils.check_image_size(dataset_dict, image)
    digest = annotations_digest(dataset_dict.get("annotations"))
    for view in views:
        transforms = view.get_transform(image.shape[:2])
        img = transforms.apply_image(image)
        img = img if img.flags["C_CONTIGUOUS"] and img.flags["WRITEABLE"] else np.array(img)
        instances = view_annotations(dataset_dict, transforms, img.shape[:2])
        boxes = instances.gt_boxes.tensor
        with torch.no_grad():
            state, clip_features = head.encode_image(img)
            out = head.sam.decode_prompts(state, boxes, with_masks=False, chunk_size=chunk_size)
        yield view, dict(
            region_tokens=out.tokens,
            clip_features=clip_features[0],
            gt_boxes=boxes,
            gt_classes=instances.gt_classes,
            image_size=tuple(img.shape[:2]),
            original_size=tuple(image.shape[:2]),
            annotations_sha256=digest,
        )


def run(args):
    """Extract this process's share; returns its summary dict."""
    setup_logger(name="regionspot", distributed_rank=comm.get_rank())
    setup_logger(name=logger.name, distributed_rank=comm.get_rank())
    cfg = setup_cfg(args)
    if not (0 <= args.shard_index < args.num_shards):
        raise SystemExit(f"--shard-index {args.shard_index} is not in 0..{args.num_shards - 1}.")
    views = [get_view(v) for v in args.views.split(",") if v.strip()]
    if not views:
        raise SystemExit("--views is empty.")
    names = _dataset_names(args, cfg)
    unknown = [n for n in names if n not in DatasetCatalog.list()]
    if unknown:
        raise SystemExit(f"Dataset(s) {unknown} are not registered in detectron2's DatasetCatalog.")
    world, rank = comm.get_world_size(), comm.get_rank()
    num_shards, shard = args.num_shards * world, args.shard_index * world + rank

    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE={device!r} but CUDA is not available: extracting on the CPU.")
        device = "cpu"
    head = build_frozen_head(cfg, device=device)
    cache = FeatureCache(args.output)
    settings = settings_from_cfg(cfg, model=head)

    def prepare(datasets):
        # The main process writes the manifest first; it refuses a directory made with other settings.
        if comm.is_main_process():
            cache.prepare(settings, datasets, views)
        comm.synchronize()
        if not comm.is_main_process():
            cache.prepare(settings, datasets, views)  # re-checks; changes nothing

    prepare({})  # settings and views checked before any dataset is loaded

    stats = dict(images=0, extracted=0, skipped=0, rewritten=0, unreadable=0, records=0, regions=0, bytes=0)
    stats["unreadable_files"] = []  # [{"dataset", "image_id", "file_name", "error"}] of the skipped images
    start = time.perf_counter()
    for name in names:
        dicts = _load_dicts(name)  # one dataset in memory at a time
        prepare({name: len(dicts)})
        indices = range(shard, len(dicts), num_shards)
        logger.info(
            f"Dataset {name!r}: {len(indices)} of {len(dicts)} images (shard {shard}/{num_shards}), views "
            f"{[v.name for v in views]}, into {cache.root}"
        )
        bar = None
        if not args.no_progress and comm.is_main_process():
            from tqdm import tqdm

            bar = tqdm(total=len(indices), desc=f"extract {name}", unit="img", dynamic_ncols=True)
        for i in indices:
            d = dicts[i]
            stats["images"] += 1
            todo = []
            for view in views:
                path = cache.path(name, view.name, d["image_id"])
                if not os.path.isfile(path):
                    todo.append(view)
                elif args.no_verify_existing:
                    continue
                elif not cache.verify(name, view.name, d["image_id"], annotations_digest(d.get("annotations"))):
                    logger.warning(f"Rewriting {path}: it does not verify.")
                    stats["rewritten"] += 1
                    todo.append(view)
            if not todo:
                stats["skipped"] += 1
            else:
                try:
                    for view, fields in extract_image(head, d, todo, cfg.MODEL.REGIONSPOT.SAM.PROMPT_CHUNK_SIZE):
                        stats["bytes"] += cache.save(name, view.name, d["image_id"], **fields)
                        stats["records"] += 1
                        stats["regions"] += len(fields["gt_classes"])
                    stats["extracted"] += 1
                except ImageReadError as e:
                    context = f"image_id {d['image_id']!r} of dataset {name!r}"
                    if args.strict:
                        raise SystemExit(f"{e.with_context(context)} (--strict: the first unreadable image stops the run)") from e
                    # One bad file must not lose the run: no record is written, so the cache stays
                    # incomplete and training from it refuses until the image is fixed or removed.
                    logger.warning(f"{e.with_context(context)} Skipped: it gets no cache record (--strict makes this an error).")
                    stats["unreadable"] += 1
                    stats["unreadable_files"].append(
                        dict(dataset=name, image_id=d["image_id"], file_name=d["file_name"], error=str(e))
                    )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    new=stats["extracted"], skipped=stats["skipped"], unreadable=stats["unreadable"],
                    regions=stats["regions"], refresh=False,
                )
        if bar is not None:
            bar.close()
        del dicts
    stats["seconds"] = time.perf_counter() - start
    return stats


def _summarise(all_stats):
    keys = ("images", "extracted", "skipped", "rewritten", "unreadable", "records", "regions", "bytes")
    total = {k: sum(s[k] for s in all_stats) for k in keys}
    total["unreadable_files"] = [f for s in all_stats for f in s["unreadable_files"]]
    total["seconds"] = max(s["seconds"] for s in all_stats)
    total["images_per_s"] = total["extracted"] / total["seconds"] if total["seconds"] > 0 else 0.0
    total["processes"] = len(all_stats)
    return total


def _worker(args):
    register_coco_datasets(args.coco_dataset)  # in every process launch starts
    stats = run(args)
    all_stats = comm.gather(stats, dst=0)
    if not comm.is_main_process():
        return None
    summary = _summarise(all_stats)
    logger.info(
        "Done: {images} images ({extracted} extracted, {skipped} already cached, {rewritten} rewritten), "
        "{records} files, {regions} regions, {mib:.1f} MiB written in {seconds:.1f} s ({images_per_s:.2f} images/s)".format(
            mib=summary["bytes"] / 2**20, **summary
        )
    )
    if summary["unreadable"]:
        shown = summary["unreadable_files"][:10]
        listed = ", ".join(f"{f['file_name']} ({f['dataset']}, image_id {f['image_id']!r})" for f in shown)
        listed += ", ..." if summary["unreadable"] > len(shown) else ""
        logger.warning(
            f"{summary['unreadable']} images skipped (unreadable, see warnings): {listed}. They have no record, so "
            "training from this cache stops with 'Feature cache ... is incomplete'. Replace the files with good "
            "copies and run this command again with the same --output (it extracts only what is missing), or "
            "remove the images from the dataset json and extract into a new --output."
        )
    return summary


def main(argv=None):
    """
    Run the extraction with the command line ``argv`` (default: ``sys.argv[1:]``); returns the summary dict (images, extracted, skipped (already cached),
    unreadable and unreadable_files (skipped bad images), regions, bytes, seconds, ...).
    """
    args = get_parser().parse_args(argv)
    if args.num_gpus > 1:
        from functools import partial

        from detectron2.engine import launch

        from .distributed import run_then_close

        launch(partial(run_then_close, _worker), args.num_gpus, num_machines=1, machine_rank=0, dist_url=args.dist_url,
               args=(args,))
        return None
    return _worker(args)
