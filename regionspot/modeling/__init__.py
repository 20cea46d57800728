"""RegionSpot's models; importing this package registers the meta-architectures, ROI head and proposal generator."""
from .clip_features import ClipDenseFeatures, build_clip
from .fusion import RegionSpotFusion
from .losses import region_focal_loss
from .model_registry import LOCALIZER_REGISTRY, VLM_REGISTRY, build_localizer, build_vlm
# The other families register with the registries on import (their packages load only when one is built).
from .localizers import HQSamRegionTokens, Sam2RegionTokens
from .open_clip_features import OpenClipDenseFeatures
from .masks import SamMasks
from .meta_arch import RegionSpot  # registers META_ARCHITECTURE "RegionSpot"
from .postprocessing import DetectionSelector, rescale_results, select_detections
from .roi_heads import RegionSpotROIHeads  # registers ROI_HEADS "RegionSpotROIHeads"
from .proposal_generators import SamAutomaticProposals  # registers PROPOSAL_GENERATOR "SamAutomaticProposals"
from .relabel import RegionSpotRelabel, load_head_weights  # registers META_ARCHITECTURE "RegionSpotRelabel"
from .sam_tokens import SamRegionTokens, build_sam
from .text_embeddings import (
    PROMPT_TEMPLATES,
    PromptEnsembleEncoder,
    TextEmbeddingCache,
    clean_class_name,
    encode_vocabulary,
)
from .zero_shot_classifier import ZeroShotClassifier, region_text_logits, vocabulary_from_config

__all__ = [k for k in globals() if not k.startswith("_")]
