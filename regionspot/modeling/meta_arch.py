"""The ``RegionSpot`` meta-architecture: given regions in, open-vocabulary instances out."""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import ImageList, Instances

from .weights import accept_released_checkpoints
from .pixels import PIXEL_FORMATS, rgb_batch
from .postprocessing import rescale_results
from .sam_tokens import SamImageState

logger = logging.getLogger(__name__)

__all__ = ["RegionSpot", "batch_vocabulary", "check_device", "rescale_results"]

BOX_SOURCES = ("GT", "PROPOSALS", "GENERATOR")


@META_ARCH_REGISTRY.register()
class RegionSpot(nn.Module):
    """
    Recognise the regions each image comes with: its annotated boxes (GT protocol), detectron2's
    precomputed proposals (boxes from any detector), or those of a proposal generator run on the
    image (``BOX_SOURCE`` "GENERATOR", e.g. ``SamAutomaticProposals``). The work is done by the ROI
    head (``MODEL.ROI_HEADS.NAME``, normally ``RegionSpotROIHeads``); there is no backbone.

    With ``SamAutomaticProposals`` the generator runs on the head's SAM: it encodes each image once
    and hands the head its proposals together with the SAM image states they were decoded from
    (``proposals, sam_states -> roi_heads``), so SAM's image encoder runs once per image, not twice.

    At test time the mapper (:class:`regionspot.data.RegionSpotTestMapper`) resizes images as
    ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` say (800/1333 in the shipped LVIS configs, the
    authors' evaluation protocol; 0 keeps the original image); SAM and CLIP build their views from
    that image, and results are brought back to the original ``height`` x ``width``.
    """

    @configurable
    def __init__(
        self,
        *,
        roi_heads: nn.Module,
        input_format: str = "RGB",
        box_source: str = "GT",
        proposal_generator: Optional[nn.Module] = None,
    ):
        """
        Args:
            roi_heads: the head that recognises regions.
            input_format: channel order of the inputs' ``image`` (``INPUT.FORMAT``). The head gets
                the mapper's uint8 pixels as RGB on the model's device, never normalised (SAM and
                CLIP normalise their own views); ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` are not used.
            box_source: "GT", "PROPOSALS" or "GENERATOR".
            proposal_generator: the regions' source with "GENERATOR".

        Raises:
            ValueError: unknown ``input_format`` or ``box_source``; "GENERATOR" without a generator.
        """
        super().__init__()
        if input_format not in PIXEL_FORMATS:
            raise ValueError(f"INPUT.FORMAT={input_format!r}: RegionSpot reads RGB or BGR images.")
        if box_source not in BOX_SOURCES:
            raise ValueError(f"MODEL.REGIONSPOT.BOX_SOURCE={box_source!r}: use one of {BOX_SOURCES}.")
        self.roi_heads = roi_heads
        self.box_source = box_source
        if box_source == "GENERATOR" and proposal_generator is None:
            raise ValueError("BOX_SOURCE='GENERATOR' needs MODEL.PROPOSAL_GENERATOR.NAME (e.g. SamAutomaticProposals).")
        self.proposal_generator = proposal_generator
        if hasattr(proposal_generator, "use_sam") and hasattr(roi_heads, "sam"):
            # One SAM for proposals and prompts, and the generator encodes the images with the head's
            # own call, so the head can decode its prompts on the generator's image states. Both read
            # the same uint8 RGB batch (preprocess_image), so they see the same pixels.
            proposal_generator.use_sam(roi_heads.sam)
        self.input_format = input_format
        # Where the model lives (an empty buffer moves with it).
        self.register_buffer("_device_anchor", torch.zeros(0), False)
        # The stock DetectionCheckpointer then reads the authors' released checkpoints too.
        accept_released_checkpoints(self)

    @classmethod
    def from_config(cls, cfg):
        check_device(cfg.MODEL.DEVICE)
        if cfg.MODEL.REGIONSPOT.BOX_SOURCE == "PROPOSALS" and not cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError(
                "MODEL.REGIONSPOT.BOX_SOURCE='PROPOSALS' needs MODEL.LOAD_PROPOSALS=True and "
                "DATASETS.PROPOSAL_FILES_TEST (see tools/convert_detections_to_proposals.py)."
            )
        return {
            "roi_heads": build_roi_heads(cfg, {}),
            "input_format": cfg.INPUT.FORMAT,
            "box_source": cfg.MODEL.REGIONSPOT.BOX_SOURCE,
            "proposal_generator": (
                build_proposal_generator(cfg, None) if cfg.MODEL.REGIONSPOT.BOX_SOURCE == "GENERATOR" else None
            ),
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """The inputs' images as one uint8 RGB batch on the model's device (:func:`~.pixels.rgb_batch`)."""
        return rgb_batch(batched_inputs, self.input_format, self.device)

    def _generated_regions(self, images: ImageList) -> Tuple[List[Instances], Optional[List[SamImageState]]]:
        """
        BOX_SOURCE "GENERATOR": the generator's proposals, and the SAM image states they came with
        when the generator encoded the images with the head's SAM (None otherwise: the head encodes).
        """
        generator = self.proposal_generator
        shares_sam = getattr(generator, "sam_encoder", None) is not None and generator.sam_encoder is getattr(
            self.roi_heads, "sam", None
        )
        if shares_sam:
            return generator.propose_with_image_states(images)
        return generator(images, {}, None)[0], None

    def _regions(self, batched_inputs: List[Dict], images: Optional[ImageList] = None) -> List[Instances]:
        """BOX_SOURCE "GT" or "PROPOSALS": the regions the inputs come with."""
        regions = []
        for x in batched_inputs:
            if self.box_source == "PROPOSALS":
                if "proposals" not in x:
                    raise ValueError(
                        "BOX_SOURCE='PROPOSALS' but an input has no 'proposals': set "
                        "MODEL.LOAD_PROPOSALS=True and DATASETS.PROPOSAL_FILES_TEST."
                    )
                regions.append(x["proposals"].to(self.device))
                continue
            if "instances" not in x:
                raise ValueError(
                    "RegionSpot recognises the regions an image comes with, and this input has none: with "
                    "MODEL.REGIONSPOT.BOX_SOURCE='GT' (this config) they are the 'instances' (gt_boxes) the "
                    "data loader keeps (regionspot.data.build_regionspot_test_loader; detectron2's "
                    "DefaultPredictor and default test loader drop them). Ways to give regions: "
                    "model.inference(inputs, detected_instances=[Instances with pred_boxes]) or "
                    "regionspot.RegionSpotPredictor(cfg).predict(boxes) for your own boxes; BOX_SOURCE "
                    "'PROPOSALS' with MODEL.LOAD_PROPOSALS and DATASETS.PROPOSAL_FILES_TEST for a detector's "
                    "boxes; BOX_SOURCE 'GENERATOR' with MODEL.PROPOSAL_GENERATOR.NAME 'SamAutomaticProposals' "
                    "for SAM's automatic masks (works with DefaultPredictor); or the RegionSpotRelabel "
                    "recipes of projects/RegionSpot."
                )
            gt = x["instances"].to(self.device)
            r = Instances(gt.image_size)
            r.proposal_boxes = gt.gt_boxes
            regions.append(r)
        return regions

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2's list of dicts: ``image`` [3, H, W] in INPUT.FORMAT,
                ``instances`` (GT boxes/classes), ``proposals`` (precomputed), ``height``/``width``.

        Returns:
            training: dict of losses; inference: list of ``{"instances": Instances}``.
        """
        if not self.training:
            return self.inference(batched_inputs)
        vocabulary = batch_vocabulary(batched_inputs)
        targets = [x["instances"].to(self.device) for x in batched_inputs]
        if all("region_tokens" in x for x in batched_inputs):
            # Features read from the cache of tools/extract_features.py: SAM and CLIP do not run.
            loss = self.roi_heads.loss_from_tokens(
                [x["region_tokens"] for x in batched_inputs],
                torch.stack([x["clip_features"] for x in batched_inputs]).to(self.device),
                [t.gt_classes for t in targets],
                vocabulary,
            )
            return {"loss_region_cls": loss}
        images = self.preprocess_image(batched_inputs)
        return self.roi_heads.losses(images, targets, vocabulary)

    def inference(
        self,
        batched_inputs: List[Dict],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """
        Args:
            batched_inputs: as in :meth:`forward`.
            detected_instances: known boxes per image (``pred_boxes``, in the input image's pixels):
                each is classified and returned in the given order.
            do_postprocess: rescale to the requested ``height``/``width``.

        Returns:
            list of ``{"instances": Instances}``.
        """
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        if detected_instances is not None:
            results = self.roi_heads.classify_given_boxes(images, [d.to(self.device) for d in detected_instances])
        elif self.box_source == "GENERATOR":
            # Proposals + the SAM image states they were decoded from -> head: SAM encodes each image once.
            proposals, sam_states = self._generated_regions(images)
            results, _ = self.roi_heads(images, {}, proposals, None, sam_states=sam_states)
        else:
            results, _ = self.roi_heads(images, {}, self._regions(batched_inputs, images), None)
        if not do_postprocess:
            return results
        # Detections (not given boxes, which keep their order) whose box is empty once clipped to the
        # image are dropped, as detectron2's detector_postprocess does.
        drop_empty = detected_instances is None
        return [
            {
                "instances": rescale_results(
                    r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1]), drop_empty=drop_empty
                )
            }
            for r, x in zip(results, batched_inputs)
        ]


def check_device(device: str) -> None:
    """Refuse a CUDA ``MODEL.DEVICE`` on a machine without CUDA, before anything is built."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE={device!r} but this machine has no usable CUDA device (torch.cuda.is_available() is "
            "False): set MODEL.DEVICE cpu (e.g. append `MODEL.DEVICE cpu` to the command line)."
        )
    if str(device).startswith("cuda:"):
        index = int(str(device).split(":")[1])
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"MODEL.DEVICE={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use one of them or MODEL.DEVICE cpu."
            )


def batch_vocabulary(batched_inputs: List[Dict]) -> Optional[str]:
    """The named vocabulary of a batch (multi-dataset training), or None for the current one."""
    names = {x.get("vocabulary") for x in batched_inputs}
    if len(names) > 1:
        raise ValueError(f"A batch mixes images of vocabularies {sorted(map(str, names))}; batches must come from one dataset.")
    return names.pop() if names else None
