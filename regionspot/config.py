"""Config namespace ``MODEL.REGIONSPOT`` and the detectron2 defaults RegionSpot relies on."""
import logging

from detectron2.config import CfgNode as CN

__all__ = ["add_regionspot_config", "get_regionspot_cfg", "upgrade_renamed_keys", "upgrade_renamed_opts", "RENAMED_KEYS"]

logger = logging.getLogger(__name__)

# Keys of MODEL.REGIONSPOT that moved into sub-nodes: old name -> (sub-node, key).
# get_regionspot_cfg (train_net.py, the tools, the predictor's configs) reads the old names in YAML
# files and command-line overrides as the new keys, with a logged message naming the new key; a
# plain cfg.merge_from_file / merge_from_list naming one fails with that message.
RENAMED_KEYS = {
    "FROZEN_PRECISION": ("FROZEN", "PRECISION"),
    "RANDOM_INIT_FROZEN": ("FROZEN", "RANDOM_INIT"),
    "RANDOM_INIT_SEED": ("FROZEN", "SEED"),
    "ALLOW_RANDOM_HEAD": ("HEAD", "ALLOW_RANDOM"),
    "HEAD_WEIGHTS": ("HEAD", "WEIGHTS"),
    "USE_BOX_SCORES": ("SCORE", "USE_BOX_SCORES"),
    "SCORING": ("SCORE", "MODE"),
    "TOPK": ("SCORE", "TOPK"),
    "BOX_SCORE_ORDER": ("SCORE", "BOX_SCORE_ORDER"),
    "CLASS_SCORE": ("SCORE", "CLASS_SCORE"),
    "VOCABULARY": ("VOCAB", "SOURCE"),
    "CUSTOM_VOCABULARY": ("VOCAB", "CUSTOM"),
    "TEXT_CACHE_DIR": ("VOCAB", "CACHE_DIR"),
    "TEXT_BATCH_SIZE": ("VOCAB", "BATCH_SIZE"),
    "MASK_ON": ("MASK", "ENABLED"),
    "MASK_SECOND_PASS_MIN_PROMPTS": ("MASK", "SECOND_PASS_MIN_PROMPTS"),
    "PROMPT_CHUNK_SIZE": ("SAM", "PROMPT_CHUNK_SIZE"),
    "FOCAL_ALPHA": ("LOSS", "FOCAL_ALPHA"),
    "FOCAL_GAMMA": ("LOSS", "FOCAL_GAMMA"),
}
_told = set()


def _renamed(old: str) -> str:
    node, key = RENAMED_KEYS[old]
    if old not in _told:
        _told.add(old)
        logger.warning(
            f"MODEL.REGIONSPOT.{old} is now MODEL.REGIONSPOT.{node}.{key}; read as the new key, but write the new "
            "name in configs and overrides."
        )
    return f"{node}.{key}"


def upgrade_renamed_keys(config: dict) -> dict:
    """A loaded YAML (nested dict) with the old names of :data:`RENAMED_KEYS` moved to their new keys."""
    section = config.get("MODEL", {}).get("REGIONSPOT") if isinstance(config.get("MODEL"), dict) else None
    if not isinstance(section, dict):
        return config
    for old in [k for k in section if k in RENAMED_KEYS]:
        node, key = _renamed(old).split(".")
        section.setdefault(node, {})[key] = section.pop(old)
    return config


def upgrade_renamed_opts(opts) -> list:
    """KEY VALUE overrides with the old names of :data:`RENAMED_KEYS` replaced by the new ones."""
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        parts = str(opts[i]).split(".")
        if len(parts) == 3 and parts[:2] == ["MODEL", "REGIONSPOT"] and parts[2] in RENAMED_KEYS:
            opts[i] = "MODEL.REGIONSPOT." + _renamed(parts[2])
    return opts


def add_regionspot_config(cfg):
    """
    Add the ``MODEL.REGIONSPOT`` namespace (and a few keys of the ``SOLVER`` namespace that
    detectron2 lacks) to ``cfg`` in place.

    Detectron2's own keys are reused where detectron2 already models a thing: ``MODEL.WEIGHTS``
    (the RegionSpot checkpoint), ``MODEL.DEVICE``, ``MODEL.LOAD_PROPOSALS`` with
    ``DATASETS.PROPOSAL_FILES_TEST`` (boxes from a file), ``TEST.DETECTIONS_PER_IMAGE``,
    ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``, ``SOLVER.AMP.ENABLED`` and ``INPUT.FORMAT``.
    """
    _C = cfg
    _C.MODEL.REGIONSPOT = CN()
    rs = _C.MODEL.REGIONSPOT

    rs.SAM = CN()
    # SAM image encoder: "vit_b", "vit_l", "vit_h" (segment_anything's registry) or "tiny"
    # (a small SAM built from the same classes, for tests and the built-in quickstart).
    rs.SAM.TYPE = "vit_b"
    # Path to SAM's official state dict (e.g. sam_vit_b_01ec64.pth). Empty: seeded random weights
    # (only allowed with RANDOM_INIT_FROZEN = True).
    rs.SAM.WEIGHTS = ""
    # Faster forwards over SAM's own weights (fused encoder attention; image side of the first
    # decoder block computed once per image; masks only when asked). Same outputs to ~1e-5.
    # False runs the stock segment_anything forwards (the reference path of tools/benchmark.py).
    rs.SAM.FAST_PATH = True

    rs.CLIP = CN()
    # CLIP model: "ViT-B/16", "ViT-L/14", "ViT-L/14@336px" or "tiny".
    rs.CLIP.TYPE = "ViT-B/16"
    # Path to OpenAI's CLIP archive (e.g. ViT-B-16.pt, TorchScript) or a plain state dict.
    rs.CLIP.WEIGHTS = ""
    # Side of the square CLIP view (224 or 336 for the released models). The checkpoint does not
    # reveal it; when it differs from CLIP's native size the positional embedding is interpolated.
    rs.CLIP.INPUT_SIZE = 224
    # Antialias of the bilinear resize that makes the CLIP view (a downscale of the whole image). The
    # authors' predictor does not antialias; their evaluation resizes with torchvision's tensor
    # resize, which antialiases from torchvision 0.17 on: False reproduces their predictor and their
    # evaluation under torchvision < 0.17, True their evaluation under torchvision >= 0.17.
    rs.CLIP.RESIZE_ANTIALIAS = False

    rs.LOCALIZER = CN()
    # Registered localizer filling the head's ``sam`` slot (regionspot.modeling.model_registry):
    # "SamRegionTokens" (segment_anything's SAM, from SAM.TYPE / SAM.WEIGHTS), "Sam2RegionTokens"
    # (SAM 2.1, the sam2 package) or "HQSamRegionTokens" (HQ-SAM and the light HQ-SAM, segment_anything_hq).
    rs.LOCALIZER.NAME = "SamRegionTokens"
    # Model of that family (not read by SamRegionTokens, which reads SAM.TYPE): SAM 2.1 "sam2.1_hiera_t",
    # "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l" or "tiny"; HQ-SAM "vit_b", "vit_l", "vit_h",
    # "vit_tiny" (light HQ-SAM, TinyViT encoder) or "tiny". Empty: sam2.1_hiera_b+ / vit_b.
    rs.LOCALIZER.TYPE = ""
    # Path to that model's official weights (sam2.1_hiera_base_plus.pt, sam_hq_vit_b.pth, ...; not read by
    # SamRegionTokens, which reads SAM.WEIGHTS). Empty: seeded random weights (only with FROZEN.RANDOM_INIT).
    rs.LOCALIZER.WEIGHTS = ""
    # For regions without a box score of their own (no objectness_logits, e.g. GT boxes or clicks), multiply
    # class probabilities by sigmoid of the localizer's object score (SAM 2.1 has one; others: ignored).
    # False keeps the authors' protocol.
    rs.LOCALIZER.OBJECT_SCORE_AS_BOX_SCORE = False

    rs.VLM = CN()
    # Registered vision-language model filling the head's ``clip`` slot: "ClipDenseFeatures" (OpenAI CLIP,
    # from CLIP.TYPE / CLIP.WEIGHTS) or "OpenClipDenseFeatures" (open_clip: LAION, MetaCLIP, DFN, EVA02-CLIP).
    # CLIP.INPUT_SIZE and CLIP.RESIZE_ANTIALIAS set the square view of either (0: the model's native size,
    # OpenClipDenseFeatures only).
    rs.VLM.NAME = "ClipDenseFeatures"
    # open_clip model config name for OpenClipDenseFeatures, e.g. "EVA02-B-16", "ViT-B-16-quickgelu"
    # (MetaCLIP), "ViT-H-14-quickgelu" (DFN) or "RegionSpot-tiny-OpenCLIP" (tests). Not read by ClipDenseFeatures.
    rs.VLM.TYPE = ""
    # Path to that model's open_clip checkpoint (open_clip_pytorch_model.bin, .safetensors, ...). Empty:
    # seeded random weights (only with FROZEN.RANDOM_INIT). Not read by ClipDenseFeatures (CLIP.WEIGHTS).
    rs.VLM.WEIGHTS = ""
    # Folder with the Hugging Face tokenizer files of a model whose open_clip config names one
    # (hf_tokenizer_name; open_clip would download it). Empty for models with open_clip's bundled tokenizer.
    rs.VLM.TOKENIZER = ""

    # Region prompts decoded by SAM's mask decoder at once (bounds memory for many boxes: each
    # prompt carries its own copy of the 64x64x256 image tokens through the decoder).
    rs.SAM.PROMPT_CHUNK_SIZE = 32

    rs.FROZEN = CN()
    # Precision of the frozen SAM and CLIP forwards: "fp32", or autocast to "fp16" / "bf16" on the
    # model's device (GPU: the authors ran CLIP in fp16; outputs then agree only to that precision).
    # The text embeddings are encoded in fp32 regardless, so the cache does not depend on it.
    # SOLVER.AMP.ENABLED (detectron2's AMPTrainer, CUDA only) applies to the trained fusion module;
    # the frozen models follow this key even inside its autocast ("fp32" keeps them in fp32).
    rs.FROZEN.PRECISION = "fp32"
    # Build SAM and CLIP with seeded random weights when their WEIGHTS are empty. For tests,
    # benchmarks and the built-in quickstart only: such a model recognises nothing real.
    rs.FROZEN.RANDOM_INIT = False
    # Seed of those random weights (SAM's; CLIP's is SEED + 1).
    rs.FROZEN.SEED = 0

    rs.HEAD = CN()
    # RegionSpot checkpoint (fusion module; ours or the released layout) loaded by
    # regionspot.modeling.load_head_weights when MODEL.WEIGHTS holds another file, e.g. the
    # detector's in a GeneralizedRCNN recipe (projects/RegionSpot). Empty: none.
    rs.HEAD.WEIGHTS = ""
    # Evaluate a fusion module with random weights when nothing loads it (MODEL.WEIGHTS empty and no
    # HEAD.WEIGHTS); otherwise such an evaluation is refused (regionspot.checkpoint.check_head_weights),
    # since its AP means nothing. Tests / smoke runs only.
    rs.HEAD.ALLOW_RANDOM = False

    rs.DECODER = CN()
    # Number of post-norm transformer decoder layers of the fusion module.
    rs.DECODER.NUM_LAYERS = 3
    # Attention heads of each decoder layer.
    rs.DECODER.NUM_HEADS = 8
    # Hidden width of each decoder layer's feed-forward network.
    rs.DECODER.DIM_FEEDFORWARD = 2048
    # Dropout inside the decoder layers (inactive at inference).
    rs.DECODER.DROPOUT = 0.1

    # Where the region prompts come from in the RegionSpot meta-architecture: "GT" (the
    # annotations' boxes, the authors' GT-box protocol), "PROPOSALS" (detectron2's precomputed
    # proposals: set MODEL.LOAD_PROPOSALS and DATASETS.PROPOSAL_FILES_TEST) or "GENERATOR" (the
    # proposal generator MODEL.PROPOSAL_GENERATOR.NAME, e.g. SamAutomaticProposals).
    rs.BOX_SOURCE = "GT"

    # How detections are made from the regions' class scores.
    rs.SCORE = CN()
    # "topk_pairs": the top TOPK (region, class) pairs of the image (one box may appear with several
    #               classes), the authors' protocol;
    # "per_region": one detection per region with its best class.
    rs.SCORE.MODE = "topk_pairs"
    # k of "topk_pairs" (the authors use 900); TEST.DETECTIONS_PER_IMAGE is applied after it.
    rs.SCORE.TOPK = 900
    # Multiply class probabilities by the box's own score (sigmoid of the proposal's
    # objectness_logits), as the authors do with GLIP boxes. Ignored for GT boxes.
    rs.SCORE.USE_BOX_SCORES = True
    # When box scores multiply the class probabilities (USE_BOX_SCORES with detector boxes):
    # "after_topk": the top TOPK pairs by class probability first, then times the box score, then
    #               sorted by the product (the authors' evaluation);
    # "before_topk": the top TOPK pairs by box score x class probability.
    rs.SCORE.BOX_SCORE_ORDER = "after_topk"
    # How region logits become class scores: "softmax" over the vocabulary (the authors' evaluation; a
    # one-class vocabulary then scores every region 1.0) or "sigmoid" of each class's logit on its own
    # (what the focal loss trains; not the authors' protocol, may saturate at CLIP's logit scale 100).
    rs.SCORE.CLASS_SCORE = "softmax"

    # Test-time image-scale protocol. With INPUT.MIN_SIZE_TEST > 0 the test mapper first resizes the
    # image as detectron2's default test mapper does (ResizeShortestEdge(MIN_SIZE_TEST,
    # MAX_SIZE_TEST), PIL bilinear), SAM and CLIP make their views from that image, and results are
    # brought back to the original size; MIN_SIZE_TEST 0 keeps the original image (one resize).
    # Where the authors' evaluation has a defect, "authors" reproduces it and "fixed" does not.
    rs.PROTOCOL = CN()
    # Boxes into the resized frame: "authors" scales x by the height ratio and y by the width ratio
    # (as their helper does; up to ~0.3 px off), "fixed" x by the width and y by the height ratio.
    rs.PROTOCOL.BOX_RESCALE = "authors"
    # Masks at the original size: "authors" thresholds SAM's mask at the resized scale, then resizes
    # the binary mask with nearest neighbour; "fixed" up-samples SAM's mask logits straight to the
    # original size and thresholds there (sharper on small objects).
    rs.PROTOCOL.MASK_RESIZE = "authors"
    # Precomputed proposals: "as_given" uses every box of the file as it is (no clipping, no
    # dropping of empty boxes, no cap; the authors' protocol, and regions attend to each other, so
    # the set matters); "detectron2" clips them to the image, drops empty ones and keeps the first
    # DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST (detectron2's transform_proposals).
    rs.PROTOCOL.PROPOSALS = "as_given"

    rs.EVAL = CN()
    # AP computed by train_net.py and tools: "standard" (detectron2's LVISEvaluator / COCOEvaluator;
    # LVIS keeps the 300 best detections per image) or "fixed" (LVIS fixed AP, Dave et al. 2021: the
    # top FIXED_AP_TOPK_PER_CLASS detections of each class over the whole dataset, no per-image cap;
    # box AP only). For fixed AP raise TOPK and TEST.DETECTIONS_PER_IMAGE (e.g. 1000 pairs per image).
    rs.EVAL.AP_KIND = "standard"
    # K of fixed AP: detections kept per class over the dataset (10,000 in Dave et al.).
    rs.EVAL.FIXED_AP_TOPK_PER_CLASS = 10000

    rs.VOCAB = CN()
    # Where the class names come from: "dataset" (thing_classes of the first DATASETS.TEST /
    # DATASETS.TRAIN entry) or "custom" (CUSTOM).
    rs.VOCAB.SOURCE = "dataset"
    # Class names used when SOURCE = "custom".
    rs.VOCAB.CUSTOM = []
    # Directory of the text-embedding cache (keyed by CLIP weights, templates and names).
    # Empty: $REGIONSPOT_CACHE or ~/.cache/regionspot.
    rs.VOCAB.CACHE_DIR = ""
    # Sentences encoded per CLIP text forward when building a vocabulary.
    rs.VOCAB.BATCH_SIZE = 256

    rs.MASK = CN()
    # Return SAM masks (pred_masks). Disable for box-only evaluation to skip mask up-sampling.
    rs.MASK.ENABLED = True
    # With at least this many prompts in an image, masks are decoded in a second pass for the
    # regions that survive scoring only, instead of keeping every region's mask logits (memory then
    # stays flat as the prompts grow; each kept region is decoded twice). 0 disables the second pass.
    rs.MASK.SECOND_PASS_MIN_PROMPTS = 400

    rs.LOSS = CN()
    # Sigmoid focal loss of training (reference: alpha 0.25, gamma 2).
    rs.LOSS.FOCAL_ALPHA = 0.25
    rs.LOSS.FOCAL_GAMMA = 2.0

    rs.FEATURE_CACHE = CN()
    # Directory of a feature cache written by tools/extract_features.py. When set, training reads
    # SAM region tokens and CLIP feature maps from it and never runs SAM or CLIP.
    rs.FEATURE_CACHE.DIR = ""

    rs.DETECTOR = CN()
    # Config of the stock detector whose boxes the RegionSpotRelabel meta-architecture re-labels: a
    # YAML path, or "model_zoo:<name>" for a config shipped with detectron2.
    rs.DETECTOR.CONFIG = ""
    # Weights of that detector (path or detectron2:// URL), loaded when the model is built. Empty:
    # random weights (tests only; a warning is logged).
    rs.DETECTOR.WEIGHTS = ""
    # Overrides of the detector's config, KEY VALUE pairs as on a command line.
    rs.DETECTOR.OPTS = []

    rs.AMG = CN()
    # SAM's automatic mask generator as proposal generator (PROPOSAL_GENERATOR.NAME
    # "SamAutomaticProposals"): grid of points_per_side^2 point prompts.
    rs.AMG.POINTS_PER_SIDE = 32
    # Point prompts decoded at once.
    rs.AMG.POINTS_PER_BATCH = 64
    # Keep masks whose predicted IoU exceeds this (SAM's default 0.88).
    rs.AMG.PRED_IOU_THRESH = 0.88
    # Keep masks whose stability score exceeds this (SAM's default 0.95).
    rs.AMG.STABILITY_SCORE_THRESH = 0.95
    # Box NMS IoU among the generated masks (SAM's default 0.7).
    rs.AMG.BOX_NMS_THRESH = 0.7
    # At most this many proposals per image, highest predicted IoU first.
    rs.AMG.MAX_PROPOSALS = 300

    # Sampling weight of each DATASETS.TRAIN entry in multi-dataset training (each batch comes from
    # one dataset and is classified against that dataset's vocabulary). Empty: equal weights.
    _C.DATALOADER.DATASET_RATIOS = []

    # Optimizer of the fusion module: "ADAMW" (the authors' recipe) or "SGD" (detectron2's default).
    _C.SOLVER.OPTIMIZER = "ADAMW"

    # Old names of moved keys: a merge naming one (cfg.merge_from_file / merge_from_list) fails with a
    # message naming the new key; get_regionspot_cfg reads them as the new keys.
    for old, (node, key) in RENAMED_KEYS.items():
        _C.register_renamed_key(
            f"MODEL.REGIONSPOT.{old}", f"MODEL.REGIONSPOT.{node}.{key}",
            "Use the new name, or load the config with regionspot.config.get_regionspot_cfg, which reads old names.",
        )
    return cfg


def get_regionspot_cfg(config_file: str = "", opts=()):
    """
    detectron2's default config with the RegionSpot namespace, a YAML recipe and KEY VALUE overrides
    merged in, not frozen.

    Raises:
        FileNotFoundError: ``config_file`` does not exist (its path is named).
    """
    import os

    from detectron2.config import get_cfg

    cfg = add_regionspot_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file not found: {config_file!r} (--config-file).")
        # detectron2's merge_from_file, with the old key names of the file (and its _BASE_ files) read.
        loaded = type(cfg)(upgrade_renamed_keys(cfg.load_yaml_with_base(config_file, allow_unsafe=True)))
        if loaded.get("VERSION", cfg.VERSION) == cfg.VERSION:
            cfg.merge_from_other_cfg(loaded)
        else:  # an older detectron2 config version: detectron2 upgrades it
            cfg.merge_from_file(config_file)
    cfg.merge_from_list(upgrade_renamed_opts(opts))
    return cfg
