#!/usr/bin/env python
"""
RegionSpot demo: recognise the regions of images with an open vocabulary, in the manner of
detectron2's ``demo/demo.py``.

RegionSpot classifies given regions; it does not find them. The boxes come either from a JSON file::

    python demo/demo.py --config-file configs/Base-RegionSpot-BB.yaml --input photos/ \\
        --boxes boxes.json --vocabulary lvis --output out/ \\
        --opts MODEL.WEIGHTS weights/regionspot_bb.pth

(``boxes.json``: ``{"img1.jpg": [[x1, y1, x2, y2], [x1, y1, x2, y2, score], ...], ...}``, keyed by the
image's file name, XYXY pixels of the image as read, with EXIF orientation applied) or from a stock
detectron2 detector whose detections become the prompts::

    python demo/demo.py --input photo.jpg --output out/ --vocabulary coco \\
        --detector-config COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml

(a model-zoo name loads that model's checkpoint unless ``--detector-weights`` says otherwise).

Each region keeps its best class; its score is the class probability (softmax over the vocabulary)
times the box's own score (the detector's score or the 5th JSON number; 1 without one). Regions below
``--confidence-threshold`` are dropped. Written to ``--output``:

* ``<image file name>``: the image with boxes, "name score" labels and SAM masks (``Visualizer``);
* ``results.json``: COCO-style results, one entry per kept region: ``image_id`` (0-based index of the
  image in the sorted input list), ``file_name`` (the input path), ``category_id`` (0-based index into
  the vocabulary), ``category_name``, ``bbox`` (XYWH pixels), ``score`` and ``segmentation`` (RLE,
  left out with ``--no-masks``);
* ``vocabulary.json``: the class names, index = ``category_id``.

An image that cannot be read (missing, empty, not an image, truncated or corrupt) is skipped with one
warning naming it and the cause; the others are processed and written, and a count of the skipped
images ends the run (exit 0). ``--strict`` makes the first unreadable image an error (exit 2); a run in
which no image can be read is always an error. 16-bit images are read as ``value >> 8``. ``--output``
may not be a folder that holds an input image (nor an input file itself): the visualisations are
named after the inputs and would overwrite them.

The default config (``configs/Quickstart/RegionSpot-tiny_shapes.yaml``) uses tiny SAM/CLIP with random stand-in
weights: it runs anywhere but recognises nothing real. See the README for the released weights.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "Quickstart", "RegionSpot-tiny_shapes.yaml")
VOCABULARY_CHOICES = ("lvis", "coco", "objects365", "custom")
# Files taken from folders and globs; a file named explicitly is always taken.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Extensions OpenCV writes: other inputs get their visualisation as <file name>.png.
_WRITABLE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("regionspot.demo")


class UsageError(ValueError):
    """A problem with the command line or the files it names (reported without a traceback)."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="RegionSpot: open-vocabulary recognition of given regions (boxes from a JSON file or a detector).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="RegionSpot config (default: %(default)s)")
    p.add_argument(
        "--input", nargs="+", required=True, metavar="PATH",
        help="image files, folders (all images in them) or glob patterns (quote them); sorted",
    )
    p.add_argument("--output", default="output/demo", metavar="DIR", help="output folder, created (default: %(default)s)")
    p.add_argument(
        "--vocabulary", choices=VOCABULARY_CHOICES, default=None,
        help="class names to recognise (default: custom with --custom-vocabulary, else lvis)",
    )
    p.add_argument("--custom-vocabulary", default=None, metavar="NAMES", help='comma-separated names, e.g. "cat,dog,sofa"')
    p.add_argument(
        "--boxes", default=None, metavar="JSON",
        help="JSON: image file name -> list of [x1, y1, x2, y2] or [x1, y1, x2, y2, score] (pixels)",
    )
    p.add_argument(
        "--detector-config", default=None, metavar="FILE",
        help="detectron2 detector config (file or model-zoo name) whose detections are the prompts",
    )
    p.add_argument(
        "--detector-weights", default=None, metavar="FILE",
        help="detector checkpoint (default: the model zoo's for a zoo name, else the config's MODEL.WEIGHTS); "
        "\"\" = random weights (tests only)",
    )
    p.add_argument("--detector-opts", nargs="*", default=[], metavar="KEY VALUE", help="detector config overrides")
    p.add_argument(
        "--confidence-threshold", type=float, default=0.3,
        help="minimum region score: class probability x box score (default: %(default)s)",
    )
    p.add_argument("--no-masks", action="store_true", help="neither draw nor save SAM masks (faster)")
    p.add_argument(
        "--strict", action="store_true",
        help="stop at the first unreadable image (default: skip it with a warning and go on)",
    )
    p.add_argument("--cpu", action="store_true", help="run on the CPU (MODEL.DEVICE cpu)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE", help="RegionSpot config overrides")
    return p


# ---------------------------------------------------------------------------------------------
# Inputs
def expand_inputs(patterns):
    """
    Files named by ``patterns``: a folder gives its image files, a file itself, anything else is a
    glob pattern (image files only). Sorted within each pattern, duplicates dropped.

    Returns:
        (files, patterns that matched nothing)
    """
    files, unmatched, seen = [], [], set()
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in os.listdir(path)]
            found = [f for f in found if os.path.isfile(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(path):
            found = [path]
        else:
            found = [f for f in glob.glob(path) if os.path.isfile(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            unmatched.append(pattern)
        for f in sorted(found):
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, unmatched


def _parse_box(key, i, box):
    where = f"entry {key!r}, box {i}"
    if not isinstance(box, (list, tuple)) or len(box) not in (4, 5):
        raise UsageError(f"{where}: expected [x1, y1, x2, y2] or [x1, y1, x2, y2, score], got {box!r}.")
    values = []
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"{where}: {v!r} is not a number (box {box!r}).")
        if v != v or v in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: {v!r} is not finite (box {box!r}).")
        values.append(float(v))
    x1, y1, x2, y2 = values[:4]
    if x2 < x1 or y2 < y1:
        raise UsageError(f"{where}: x2 < x1 or y2 < y1 in {box!r}; boxes are XYXY, not XYWH.")
    return values[:4], values[4] if len(values) == 5 else 1.0


def load_boxes_json(path):
    """
    Read a boxes JSON: ``{file name: [[x1, y1, x2, y2(, score)], ...]}``.

    Returns:
        {file name: (boxes [[x1, y1, x2, y2], ...], scores [s, ...])}, score 1.0 where none is given.

    Raises:
        UsageError (a ValueError) naming the file and the entry that is malformed.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--boxes file not found: {path}")
    try:
        with open(path, "r") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--boxes {path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(
            f"--boxes {path}: expected an object mapping image file names to lists of boxes, got a "
            f"{type(data).__name__}."
        )
    out = {}
    for key, entry in data.items():
        if not isinstance(entry, list):
            raise UsageError(f"--boxes {path}: entry {key!r} must be a list of boxes, got {type(entry).__name__}.")
        boxes, scores = [], []
        for i, box in enumerate(entry):
            try:
                b, s = _parse_box(key, i, box)
            except UsageError as e:
                raise UsageError(f"--boxes {path}: {e}") from None
            boxes.append(b)
            scores.append(s)
        out[key] = (boxes, scores)
    return out


def check_output_folder(output, patterns, files, boxes_path=None):
    """
    Refuse an ``--output`` that would overwrite the user's files: an input file itself, a folder given
    as ``--input``, a folder that holds an input image (the visualisations are named after the inputs),
    or a folder where ``results.json``/``vocabulary.json`` would replace the ``--boxes`` file.

    Raises:
        UsageError: naming the input and suggesting another ``--output``.
    """
    def real(p):
        return os.path.normcase(os.path.realpath(os.path.expanduser(p)))

    out = real(output)
    suggestion = f"Pass another folder, e.g. --output {os.path.join(os.path.dirname(out), os.path.basename(out) + '_regionspot')}"
    for path in files:
        if real(path) == out:
            raise UsageError(f"--output {output} is the input file {path}: it would be overwritten. {suggestion}.")
    if os.path.exists(os.path.expanduser(output)) and not os.path.isdir(os.path.expanduser(output)):
        raise UsageError(f"--output {output} is a file, not a folder. Pass a folder (it is created if missing).")
    for pattern in patterns:
        if os.path.isdir(os.path.expanduser(pattern)) and real(pattern) == out:
            raise UsageError(
                f"--output {output} is the input folder {pattern}: the visualisations (named after the inputs) "
                f"would overwrite your images. {suggestion}."
            )
    for path in files:
        # Both the folder the path names and its target's folder: writing over a symlink to an
        # image would overwrite the image itself.
        if out in (real(os.path.dirname(os.path.abspath(os.path.expanduser(path)))), os.path.dirname(real(path))):
            raise UsageError(
                f"--output {output} holds the input image {path}: the visualisations (named after the inputs) "
                f"would overwrite your images. {suggestion}."
            )
    if boxes_path:
        for name in ("results.json", "vocabulary.json"):
            if real(os.path.join(output, name)) == real(boxes_path):
                raise UsageError(f"--output {output} would replace the --boxes file {boxes_path} by its {name}. {suggestion}.")


def probe_inputs(files, boxes_map, strict):
    """
    Check the header of each image that will be processed (those with boxes, when a boxes JSON is
    given) before any model is built: a file that is missing, empty or not an image is warned about
    and skipped, or, with ``strict``, an error. Truncated files pass; the full read finds them.

    Returns:
        {path: ImageReadError} of the files to skip.

    Raises:
        UsageError: with ``strict`` at the first bad file, or when no image is left to process.
    """
    from regionspot.data.images import ImageReadError, probe_image

    todo = [p for p in files if boxes_map is None or os.path.basename(p) in boxes_map or p in boxes_map]
    bad = {}
    for path in todo:
        try:
            probe_image(path)
        except ImageReadError as e:
            if strict:
                raise UsageError(f"{e} (--strict: the first unreadable image stops the run)") from e
            bad[path] = e
    if todo and len(bad) == len(todo):
        first, *others = bad
        more = f" The other inputs cannot be read either: {', '.join(others)}." if others else ""
        raise UsageError(f"{bad[first]}{more} No input image can be read: nothing to do.")
    for e in bad.values():
        logger.warning(f"{e} Skipping it (--strict makes this an error).")
    return bad


def _output_name(path, used):
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    if ext.lower() not in _WRITABLE_EXTENSIONS:
        stem, ext = base, ".png"
    name, k = stem + ext, 1
    while name in used:
        name, k = f"{stem}_{k}{ext}", k + 1
    if k > 1:
        logger.warning(f"Two inputs are named {base!r}; writing the visualisation of {path} as {name}.")
    used.add(name)
    return name


# ---------------------------------------------------------------------------------------------
# Models
def setup_cfg(args, vocabulary):
    from regionspot.config import get_regionspot_cfg

    try:
        cfg = get_regionspot_cfg(args.config_file, args.opts)
    except FileNotFoundError as e:
        raise UsageError(str(e))
    if args.cpu:
        cfg.MODEL.DEVICE = "cpu"
    # The model is built with the demo's vocabulary directly (no encoding of the config's dataset).
    cfg.MODEL.REGIONSPOT.VOCABULARY = "custom"
    cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY = list(vocabulary)
    cfg.freeze()
    return cfg


def build_detector(args, device):
    """A ``DefaultPredictor`` of a stock detectron2 detector (its boxes become the prompts)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    config_path, zoo_name = args.detector_config, None
    if not os.path.isfile(config_path):
        try:
            config_path = model_zoo.get_config_file(args.detector_config)
        except RuntimeError:
            raise UsageError(
                f"--detector-config {args.detector_config!r}: no such file, and not a detectron2 model-zoo "
                "config (e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)."
            ) from None
        zoo_name = args.detector_config
    cfg = get_cfg()
    cfg.merge_from_file(config_path)
    if args.detector_weights is not None:
        cfg.MODEL.WEIGHTS = args.detector_weights
    elif zoo_name is not None:
        cfg.MODEL.WEIGHTS = model_zoo.get_checkpoint_url(zoo_name)
    cfg.MODEL.DEVICE = device
    if len(args.detector_opts) % 2:
        raise UsageError(f"--detector-opts needs KEY VALUE pairs, got {args.detector_opts}.")
    cfg.merge_from_list(list(args.detector_opts))
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        logger.warning("The detector has RANDOM weights (empty MODEL.WEIGHTS): its boxes are meaningless (tests only).")
    logger.info(f"Boxes: detections of {config_path} (weights: {cfg.MODEL.WEIGHTS or 'random'}, device {cfg.MODEL.DEVICE})")
    return DefaultPredictor(cfg)


def detect_boxes(detector, image_rgb):
    """[N, 4] XYXY boxes and [N] scores of the detector (class labels are ignored)."""
    # DefaultPredictor takes BGR (OpenCV's order) and converts to its INPUT.FORMAT itself.
    instances = detector(image_rgb[:, :, ::-1])["instances"].to("cpu")
    return instances.pred_boxes.tensor.numpy().tolist(), instances.scores.numpy().tolist()


# ---------------------------------------------------------------------------------------------
def recognise(predictor, image, boxes, box_scores, threshold, with_masks):
    """
    Best class of each region, kept where class probability x box score >= ``threshold``,
    sorted by descending score.

    Returns:
        dict of numpy arrays: boxes [K, 4], classes [K], scores [K], masks [K, H, W] (or None).
    """
    import numpy as np
    import torch

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    h, w = image.shape[:2]
    if len(boxes) == 0:
        return {
            "boxes": boxes, "classes": np.zeros(0, np.int64), "scores": np.zeros(0, np.float32),
            "masks": np.zeros((0, h, w), bool) if with_masks else None,
        }
    predictor.set_image(image, "RGB")
    out = predictor.predict(torch.as_tensor(boxes), return_masks=with_masks)
    probs, classes = out["scores"].float().cpu().max(dim=1)
    scores = probs * torch.as_tensor(box_scores, dtype=torch.float32)
    keep = torch.nonzero(scores >= threshold).flatten()
    keep = keep[scores[keep].argsort(descending=True)]
    masks = out["masks"][keep.to(out["masks"].device)].cpu().numpy() if with_masks else None
    return {
        "boxes": boxes[keep.numpy()],
        "classes": classes[keep].numpy(),
        "scores": scores[keep].numpy(),
        "masks": masks,
    }


def draw(image, result, class_names):
    """Visualizer drawing: boxes, "name score" labels and masks, one colour per class."""
    from detectron2.utils.colormap import colormap
    from detectron2.utils.visualizer import ColorMode, Visualizer

    vis = Visualizer(image, metadata=None, scale=1.0, instance_mode=ColorMode.IMAGE)
    if len(result["boxes"]) == 0:
        return vis.output.get_image()
    palette = colormap(rgb=True, maximum=1)
    labels = [f"{class_names[c]} {s:.2f}" for c, s in zip(result["classes"], result["scores"])]
    colors = [palette[c % len(palette)] for c in result["classes"]]
    out = vis.overlay_instances(
        boxes=result["boxes"], labels=labels, masks=result["masks"], assigned_colors=colors
    )
    return out.get_image()


def to_coco_results(result, image_id, file_name, class_names):
    import numpy as np
    import pycocotools.mask as mask_util

    rles = None
    if result["masks"] is not None and len(result["masks"]):
        rles = mask_util.encode(np.asfortranarray(result["masks"].transpose(1, 2, 0).astype(np.uint8)))
    entries = []
    for k, (box, c, s) in enumerate(zip(result["boxes"], result["classes"], result["scores"])):
        x1, y1, x2, y2 = (float(v) for v in box)
        entry = {
            "image_id": image_id,
            "file_name": file_name,
            "category_id": int(c),
            "category_name": class_names[int(c)],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(s),
        }
        if rles is not None:
            rle = rles[k]
            entry["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        entries.append(entry)
    return entries


def run(args):
    # Cheap checks first: no model is built for a command line that cannot work.
    if args.boxes and args.detector_config:
        raise UsageError("Pass either --boxes or --detector-config, not both.")
    if not args.boxes and not args.detector_config:
        raise UsageError(
            "No region prompts: RegionSpot recognises given regions. Pass --boxes boxes.json "
            "(image file name -> [[x1, y1, x2, y2(, score)], ...]) or --detector-config <detectron2 config> "
            "(e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml) to detect them."
        )
    vocabulary_name = args.vocabulary or ("custom" if args.custom_vocabulary else "lvis")
    if args.custom_vocabulary and vocabulary_name != "custom":
        raise UsageError(f"--custom-vocabulary is only used with --vocabulary custom (got --vocabulary {vocabulary_name}).")
    files, unmatched = expand_inputs(args.input)
    if not files:
        raise UsageError(
            f"No input images found for --input {' '.join(repr(p) for p in args.input)} "
            f"(image files, folders of {'/'.join(IMAGE_EXTENSIONS)} files, or glob patterns)."
        )
    for pattern in unmatched:
        logger.warning(f"--input {pattern!r} matched no image file.")
    boxes_map = load_boxes_json(args.boxes) if args.boxes else None
    # Before anything is read or built: never write over the user's images.
    check_output_folder(args.output, args.input, files, args.boxes)
    unreadable = probe_inputs(files, boxes_map, args.strict)

    import cv2
    import torch
    from tqdm import tqdm

    from regionspot import RegionSpotPredictor
    from regionspot.data.images import ImageReadError, read_image
    from regionspot.data.vocabularies import get_vocabulary

    class_names = get_vocabulary(vocabulary_name, args.custom_vocabulary)
    logger.info(f"Vocabulary: {vocabulary_name}, {len(class_names)} classes")
    cfg = setup_cfg(args, class_names)
    if cfg.MODEL.REGIONSPOT.RANDOM_INIT_FROZEN:
        logger.warning(
            "MODEL.REGIONSPOT.RANDOM_INIT_FROZEN is on: SAM and CLIP have random stand-in weights, so the "
            "predictions are meaningless (use real weights, see the README)."
        )
    elif not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the fusion module is untrained, so the predictions are meaningless.")
    if boxes_map is not None:
        logger.info(f"Boxes: {args.boxes} ({len(boxes_map)} images)")
        detector = None
    else:
        detector = build_detector(args, cfg.MODEL.DEVICE)

    predictor = RegionSpotPredictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    logger.info(f"{len(files)} input images -> {args.output}")

    # image_id stays the index in the sorted input list, also when images before it are skipped.
    results, used_names, done, no_boxes = [], set(), 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for image_id, path in enumerate(tqdm(files, desc="RegionSpot", unit="image")):
            if path in unreadable:  # already warned about by probe_inputs
                continue
            base = os.path.basename(path)
            if boxes_map is not None:
                entry = boxes_map.get(base, boxes_map.get(path))
                if entry is None:
                    logger.warning(f"No boxes for {base!r} in {args.boxes}: skipping {path}.")
                    no_boxes += 1
                    continue
            try:
                image = read_image(path, format="RGB")
            except ImageReadError as e:
                # Truncated or corrupt pixel data: only the full decode finds it.
                if args.strict:
                    raise UsageError(f"{e} (--strict: the first unreadable image stops the run)") from e
                logger.warning(f"{e} Skipping it (--strict makes this an error).")
                unreadable[path] = e
                continue
            if not image.flags.writeable:  # PIL's buffer; torch warns about read-only arrays
                image = image.copy()
            if boxes_map is not None:
                boxes, box_scores = entry
            else:
                boxes, box_scores = detect_boxes(detector, image)
            result = recognise(predictor, image, boxes, box_scores, args.confidence_threshold, not args.no_masks)
            vis = draw(image, result, class_names)
            out_path = os.path.join(args.output, _output_name(path, used_names))
            if not cv2.imwrite(out_path, vis[:, :, ::-1]):
                raise UsageError(f"Could not write {out_path}.")
            results.extend(to_coco_results(result, image_id, path, class_names))
            logger.debug(f"{path}: {len(boxes)} regions, {len(result['boxes'])} kept -> {out_path}")
            done += 1

    if done == 0 and unreadable:
        raise UsageError(f"No input image could be read ({len(unreadable)} unreadable, see the warnings): no results were written.")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(args.output, "vocabulary.json"), "w") as f:
        json.dump(list(class_names), f, indent=0)
    if done == 0:
        logger.warning("No image was processed.")
    logger.info(
        f"{done} images, {len(results)} regions kept, {time.perf_counter() - start:.1f}s; "
        f"results in {os.path.join(args.output, 'results.json')}"
    )
    skipped = len(unreadable) + no_boxes
    if skipped:
        print(f"{skipped} images skipped (see warnings): {len(unreadable)} unreadable, {no_boxes} without boxes.")
    return 0


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="regionspot")
    try:
        return run(args)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0] or 'demo.py')}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
