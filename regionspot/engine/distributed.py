"""Ending a run of several processes cleanly (detectron2's ``launch`` starts them and leaves the group open)."""
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["close_process_group", "run_then_close"]


def close_process_group() -> None:
    """
    Wait for every process, then destroy the default process group. A process that exits with a gloo
    group still open can be aborted by the library's own threads ("terminate called without an active
    exception"), which fails the whole run after its work is done. A no-op without a process group.
    """
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def run_then_close(main_func, *args):
    """
    ``main_func(*args)``, then :func:`close_process_group`. Give ``functools.partial(run_then_close, main)``
    to detectron2's ``launch`` (it pickles the function for each process; ``main`` must be module-level).
    An exception propagates at once, without waiting for the other processes.
    """
    result = main_func(*args)
    close_process_group()
    return result
