"""RegionSpot's models; importing this package registers the meta-architecture and ROI head."""
from .clip_features import ClipDenseFeatures, build_clip
from .fusion import RegionSpotFusion, region_text_logits
from .masks import SamMasks
from .meta_arch import RegionSpot  # registers META_ARCHITECTURE "RegionSpot"
from .roi_heads import RegionSpotROIHeads, select_detections  # registers ROI_HEADS "RegionSpotROIHeads"
from .proposal_generators import SamAutomaticProposals  # registers PROPOSAL_GENERATOR "SamAutomaticProposals"
from .relabel import RegionSpotRelabel, load_head_weights  # registers META_ARCHITECTURE "RegionSpotRelabel"
from .sam_tokens import SamRegionTokens, build_sam
from .text_embeddings import PROMPT_TEMPLATES, TextEmbeddingCache, clean_class_name, encode_vocabulary

__all__ = [k for k in globals() if not k.startswith("_")]
