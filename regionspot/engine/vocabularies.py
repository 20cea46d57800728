"""
Training vocabularies on the model side of multi-dataset training (the data side is
:mod:`regionspot.data.multi_dataset`): the head gets each training dataset's class names registered
under the dataset's name (``RegionSpotROIHeads.add_vocabulary``), which is what a batch's
``"vocabulary"`` refers to. The text embeddings are encoded once per machine (by the local main
process, into the on-disk text cache); the other ranks wait and read the cache.
"""
import contextlib
import logging
from typing import Dict, Sequence

from detectron2.utils import comm

from ..data.multi_dataset import dataset_class_names

logger = logging.getLogger(__name__)

__all__ = ["local_main_process_first", "register_training_vocabularies"]


@contextlib.contextmanager
def local_main_process_first():
    """
    Run the body in each machine's local main process first, then in the other processes (which
    wait at a barrier meanwhile), e.g. to fill an on-disk cache once per machine. A no-op without
    distributed training. Every process must enter it.
    """
    distributed = comm.get_world_size() > 1
    main = comm.get_local_rank() == 0
    if distributed and not main:
        comm.synchronize()
    yield
    if distributed and main:
        comm.synchronize()


def register_training_vocabularies(model, dataset_names: Sequence[str]) -> Dict[str, int]:
    """
    Register each training dataset's class names as a named vocabulary of the model's head
    (``model.roi_heads.add_vocabulary(name, thing_classes)``), which the batches of that dataset use.

    The text embeddings are encoded by each machine's local main process and written to the text
    cache first; the other ranks wait (``comm.synchronize``) and then read them from the cache.
    Every rank must call this.

    Args:
        model: RegionSpot, optionally wrapped (``.module``).
        dataset_names: registered training datasets.

    Returns:
        dataset name -> number of classes.
    """
    head = (model.module if hasattr(model, "module") else model).roi_heads
    if not hasattr(head, "add_vocabulary"):
        raise TypeError(f"{type(head).__name__} cannot hold per-dataset vocabularies (no add_vocabulary).")
    vocabularies = {name: dataset_class_names(name) for name in dataset_names}
    with local_main_process_first():
        for name, classes in vocabularies.items():
            head.add_vocabulary(name, classes)
            logger.info(f"Registered the vocabulary of training dataset {name!r} ({len(classes)} classes)")
    return {name: len(classes) for name, classes in vocabularies.items()}
