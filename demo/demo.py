#!/usr/bin/env python
"""
RegionSpot demo: recognise the regions of images with an open vocabulary, in the manner of
detectron2's ``demo/demo.py``. A thin command line around the model: it builds the config, the model
and its checkpointer, feeds each image to ``model(...)``, draws the results with detectron2's
``Visualizer`` and writes them out. Where the regions come from is the model's business:

* ``--boxes boxes.json``: your boxes, as the precomputed proposals of the ``RegionSpot``
  meta-architecture (``BOX_SOURCE PROPOSALS``; the 5th number of a box is its score)::

    python demo/demo.py --config-file configs/Base-RegionSpot-BB.yaml --input photos/ \\
        --boxes boxes.json --vocabulary lvis --output out/ --opts MODEL.WEIGHTS weights/regionspot_bb.pth

  (``boxes.json``: ``{"img1.jpg": [[x1, y1, x2, y2], [x1, y1, x2, y2, score], ...], ...}``, keyed by
  the image's file name, XYXY pixels of the image as read, with EXIF orientation applied, scores in
  [0, 1]);
* ``--detector-config``: a stock detectron2 detector's boxes, re-labelled by the ``RegionSpotRelabel``
  meta-architecture (``MODEL.REGIONSPOT.DETECTOR.CONFIG``: a YAML path or ``model_zoo:<name>``, as in
  the configs)::

    python demo/demo.py --input photo.jpg --output out/ --vocabulary coco \\
        --detector-config model_zoo:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml

  (a ``model_zoo:`` name loads that model's checkpoint, a YAML file its ``MODEL.WEIGHTS``, unless
  ``--detector-weights`` says otherwise; ``""`` gives random weights, for tests);
* neither: a config whose model finds the regions itself, e.g. SAM's automatic mask generator
  (``BOX_SOURCE GENERATOR``) or a ``RegionSpotRelabel`` / ``GeneralizedRCNN`` recipe of
  ``projects/RegionSpot/configs/``.

Each region keeps its best class (``MODEL.REGIONSPOT.SCORE.MODE per_region``); its score is the class
probability (softmax over the vocabulary) times the box's own score (``SCORE.USE_BOX_SCORES``: the JSON's
5th number, the detector's score, SAM's predicted IoU; 1 without one). Regions below
``--confidence-threshold`` are dropped. Images are given to the model as its test loader would
(``INPUT.FORMAT``, resized as ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` say), and the results come
back at the image's size. Written to ``--output``:

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

The default config (``configs/Quickstart/RegionSpot-tiny_shapes.yaml``) uses tiny SAM/CLIP with random
stand-in weights: it runs anywhere but recognises nothing real. See the README for the released weights.
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
# What DETECTOR.CONFIG calls a config shipped with detectron2.
MODEL_ZOO_PREFIX = "model_zoo:"

logger = logging.getLogger("regionspot.demo")


class UsageError(ValueError):
    """A problem with the command line or the files it names (reported without a traceback)."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="RegionSpot: open-vocabulary recognition of regions (boxes from a JSON file, a detector, "
        "or the config's own region source).",
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
        "--detector-config", default=None, metavar="CONFIG",
        help="detectron2 detector whose boxes are re-labelled (MODEL.REGIONSPOT.DETECTOR.CONFIG): a YAML path "
        "or model_zoo:<name>, e.g. model_zoo:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    )
    p.add_argument(
        "--detector-weights", default=None, metavar="FILE",
        help="detector checkpoint (MODEL.REGIONSPOT.DETECTOR.WEIGHTS; default: the model zoo's for a model_zoo: "
        "name, else the detector config's MODEL.WEIGHTS); \"\" = random weights (tests only)",
    )
    p.add_argument(
        "--detector-opts", nargs="*", default=[], metavar="KEY VALUE",
        help="detector config overrides (MODEL.REGIONSPOT.DETECTOR.OPTS)",
    )
    p.add_argument(
        "--confidence-threshold", type=float, default=0.3,
        help="minimum region score: class probability x box score (default: %(default)s)",
    )
    p.add_argument("--no-masks", action="store_true", help="neither compute, draw nor save SAM masks (faster)")
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
    score = values[4] if len(values) == 5 else 1.0
    if not 0.0 <= score <= 1.0:
        raise UsageError(f"{where}: score {score!r} is not in [0, 1] (box {box!r}).")
    return values[:4], score


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
# Config and model
def _detector_weights(config: str) -> str:
    """Default DETECTOR.WEIGHTS: the model zoo's checkpoint of a ``model_zoo:`` name, else the config's MODEL.WEIGHTS."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    if config.startswith(MODEL_ZOO_PREFIX):
        return model_zoo.get_checkpoint_url(config[len(MODEL_ZOO_PREFIX):])
    det_cfg = get_cfg()
    det_cfg.merge_from_file(config)
    return det_cfg.MODEL.WEIGHTS


def _check_detector_config(config: str) -> None:
    """A ``--detector-config`` that is neither a file nor ``model_zoo:<name>`` fails before anything is built."""
    from detectron2 import model_zoo

    if config.startswith(MODEL_ZOO_PREFIX) or os.path.isfile(config):
        return
    try:
        model_zoo.get_config_file(config)
    except RuntimeError:
        raise UsageError(
            f"--detector-config {config!r}: no such file. Give a detectron2 YAML config or "
            f"{MODEL_ZOO_PREFIX}<name of a model-zoo config> (e.g. {MODEL_ZOO_PREFIX}COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)."
        ) from None
    raise UsageError(
        f"--detector-config {config!r} is a detectron2 model-zoo name: write {MODEL_ZOO_PREFIX}{config} "
        "(the MODEL.REGIONSPOT.DETECTOR.CONFIG convention)."
    )


def setup_cfg(args, class_names):
    """
    The RegionSpot config of the run: ``--config-file``, the region source of the command line,
    per-region scoring, then ``--opts``; vocabulary and device from the command line.
    """
    from regionspot.config import get_regionspot_cfg

    try:
        cfg = get_regionspot_cfg(args.config_file)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    rs = cfg.MODEL.REGIONSPOT
    if args.detector_config:
        _check_detector_config(args.detector_config)
        if len(args.detector_opts) % 2:
            raise UsageError(f"--detector-opts needs KEY VALUE pairs, got {args.detector_opts}.")
        cfg.MODEL.META_ARCHITECTURE = "RegionSpotRelabel"
        rs.DETECTOR.CONFIG = args.detector_config
        rs.DETECTOR.WEIGHTS = (
            args.detector_weights if args.detector_weights is not None else _detector_weights(args.detector_config)
        )
        rs.DETECTOR.OPTS = list(args.detector_opts)
    if args.boxes:
        # The JSON's boxes are handed to the model as precomputed proposals (with their scores).
        rs.BOX_SOURCE = "PROPOSALS"
        cfg.MODEL.LOAD_PROPOSALS = True
    # One result per region, its best class x the box's score; every region above the threshold.
    rs.SCORE.MODE = "per_region"
    rs.SCORE.USE_BOX_SCORES = True
    rs.MASK.ENABLED = not args.no_masks
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.TEST.DETECTIONS_PER_IMAGE = 0
    try:
        cfg.merge_from_list(list(args.opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise UsageError(f"--opts {' '.join(args.opts)}: {e}") from None
    # The model is built with the demo's vocabulary directly (no encoding of the config's dataset).
    rs.VOCAB.SOURCE = "custom"
    rs.VOCAB.CUSTOM = list(class_names)
    if args.cpu:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def region_source(cfg, args) -> str:
    """
    Where the regions come from: "boxes" (the JSON), "detector" (RegionSpotRelabel), "generator"
    (BOX_SOURCE GENERATOR) or "model" (another meta-architecture that finds them, e.g. GeneralizedRCNN).

    Raises:
        UsageError: the command line and the config give no regions, or ``--boxes`` with a model that
            finds its own.
    """
    meta = cfg.MODEL.META_ARCHITECTURE
    if args.boxes:
        if meta != "RegionSpot":
            raise UsageError(
                f"--boxes needs a config of the RegionSpot meta-architecture; {args.config_file} builds {meta}, "
                "which finds its own regions (drop --boxes, or pass e.g. --config-file configs/Base-RegionSpot-BB.yaml)."
            )
        return "boxes"
    if meta == "RegionSpotRelabel":
        return "detector"
    if meta == "RegionSpot":
        if cfg.MODEL.REGIONSPOT.BOX_SOURCE == "GENERATOR":
            return "generator"
        raise UsageError(
            "No region prompts: RegionSpot recognises given regions. Pass --boxes boxes.json "
            "(image file name -> [[x1, y1, x2, y2(, score)], ...]) or --detector-config <detectron2 config> "
            f"(e.g. {MODEL_ZOO_PREFIX}COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml) to detect them, or a --config-file "
            "whose model finds them (BOX_SOURCE GENERATOR, e.g. projects/RegionSpot/configs/SAM-Proposals/)."
        )
    return "model"


def build_demo_model(cfg):
    """``build_model`` + checkpointer, as ``train_net.py --eval-only`` does; refuses a head nothing loads."""
    from detectron2.modeling import build_model

    from regionspot import RegionSpotCheckpointer
    from regionspot.checkpoint import check_head_weights
    from regionspot.modeling import load_head_weights

    # Config and weight-file problems are reported with their message (they name the key and the fix).
    try:
        check_head_weights(cfg)  # before the vocabulary is encoded
        model = build_model(cfg)
        model.eval()
        if cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        if cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS:  # MODEL.WEIGHTS was the detector's (GeneralizedRCNN recipes)
            load_head_weights(model, cfg.MODEL.REGIONSPOT.HEAD.WEIGHTS)
        check_head_weights(cfg, model)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    except OSError as e:  # a URL (detectron2://, https://) that cannot be downloaded here
        rs = cfg.MODEL.REGIONSPOT
        urls = [w for w in (cfg.MODEL.WEIGHTS, rs.HEAD.WEIGHTS, rs.DETECTOR.WEIGHTS) if "://" in w]
        raise UsageError(
            f"Could not fetch {' / '.join(urls) or 'a weight file'}: {e}. Download it and give its path "
            "(--detector-weights for the detector, --opts MODEL.WEIGHTS for RegionSpot)."
        ) from e
    return model


def model_input(cfg, image_rgb, boxes=None, box_scores=None):
    """
    One input dict of detectron2's model contract, as the test loader makes it: the image in
    ``INPUT.FORMAT`` resized as ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` say (0: as it is),
    ``height`` / ``width`` the image's own size (the results come back at it), and the given boxes
    as ``proposals`` in the resized image's pixels with ``objectness_logits`` = logit(score).
    """
    import numpy as np
    import torch
    from detectron2.data import transforms as T
    from detectron2.structures import Boxes, Instances

    height, width = image_rgb.shape[:2]
    image = image_rgb if cfg.INPUT.FORMAT == "RGB" else image_rgb[:, :, ::-1]
    min_size = int(cfg.INPUT.MIN_SIZE_TEST)
    if min_size > 0:
        transform = T.ResizeShortestEdge([min_size, min_size], cfg.INPUT.MAX_SIZE_TEST).get_transform(image)
    else:
        transform = T.NoOpTransform()
    image = transform.apply_image(image)
    x = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": height, "width": width}
    if boxes is not None:
        proposals = Instances(image.shape[:2])
        boxes = transform.apply_box(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
        proposals.proposal_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        proposals.objectness_logits = torch.logit(torch.as_tensor(box_scores, dtype=torch.float32))
        x["proposals"] = proposals
    return x


def keep_confident(instances, threshold):
    """The regions scoring at least ``threshold``, best first."""
    instances = instances[instances.scores >= threshold]
    return instances[instances.scores.argsort(descending=True)]


def draw(image_rgb, instances, metadata):
    """detectron2's ``Visualizer``: boxes, "name score" labels and masks, one colour per class."""
    from detectron2.utils.visualizer import ColorMode, Visualizer

    vis = Visualizer(image_rgb, metadata=metadata, scale=1.0, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()


def class_metadata(class_names):
    from detectron2.data.catalog import Metadata
    from detectron2.utils.colormap import colormap

    palette = colormap(rgb=True, maximum=255)
    colors = [tuple(int(v) for v in palette[c % len(palette)]) for c in range(len(class_names))]
    return Metadata(thing_classes=list(class_names), thing_colors=colors)


def to_coco_results(instances, image_id, file_name, class_names):
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    entries = instances_to_coco_json(instances, image_id)
    for entry in entries:
        entry["file_name"] = file_name
        entry["category_name"] = class_names[entry["category_id"]]
    return entries


def run(args):
    # Cheap checks first: no model is built for a command line that cannot work.
    if args.boxes and args.detector_config:
        raise UsageError("Pass either --boxes or --detector-config, not both.")
    vocabulary_name = args.vocabulary or ("custom" if args.custom_vocabulary else "lvis")
    if args.custom_vocabulary and vocabulary_name != "custom":
        raise UsageError(f"--custom-vocabulary is only used with --vocabulary custom (got --vocabulary {vocabulary_name}).")

    from regionspot.data.vocabularies import get_vocabulary

    try:
        class_names = get_vocabulary(vocabulary_name, args.custom_vocabulary)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = setup_cfg(args, class_names)
    source = region_source(cfg, args)
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

    from regionspot.data.images import ImageReadError, read_image

    logger.info(f"Vocabulary: {vocabulary_name}, {len(class_names)} classes")
    if cfg.MODEL.REGIONSPOT.FROZEN.RANDOM_INIT:
        logger.warning(
            "MODEL.REGIONSPOT.FROZEN.RANDOM_INIT is on: SAM and CLIP have random stand-in weights, so the "
            "predictions are meaningless (use real weights, see the README)."
        )
    if source == "boxes":
        logger.info(f"Boxes: {args.boxes} ({len(boxes_map)} images)")
    elif source == "detector":
        rs = cfg.MODEL.REGIONSPOT
        logger.info(f"Boxes: detections of {rs.DETECTOR.CONFIG} (weights: {rs.DETECTOR.WEIGHTS or 'random'})")
    else:
        logger.info(f"Regions: found by the model ({cfg.MODEL.META_ARCHITECTURE}, {cfg.MODEL.PROPOSAL_GENERATOR.NAME})")
    model = build_demo_model(cfg)
    metadata = class_metadata(class_names)
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
            entry = None
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
            x = model_input(cfg, image, *(entry if entry is not None else ()))
            instances = model([x])[0]["instances"].to("cpu")
            instances = keep_confident(instances, args.confidence_threshold)
            vis = draw(image, instances, metadata)
            out_path = os.path.join(args.output, _output_name(path, used_names))
            if not cv2.imwrite(out_path, vis[:, :, ::-1]):
                raise UsageError(f"Could not write {out_path}.")
            results.extend(to_coco_results(instances, image_id, path, class_names))
            logger.debug(f"{path}: {len(instances)} regions kept -> {out_path}")
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
