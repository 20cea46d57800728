"""Evaluation of RegionSpot: evaluators, the evaluation loop over DATASETS.TEST and protocol cards."""
from .evaluator import AP_KINDS, build_regionspot_evaluator, evaluate_datasets
from .fixed_ap import LVISFixedAPEvaluator
from .protocol_card import build_protocol_card, image_scale_protocol, write_protocol_cards

__all__ = [
    "AP_KINDS",
    "LVISFixedAPEvaluator",
    "build_protocol_card",
    "build_regionspot_evaluator",
    "evaluate_datasets",
    "image_scale_protocol",
    "write_protocol_cards",
]
