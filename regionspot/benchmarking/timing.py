"""
Phase timers and memory peaks.

:class:`PhaseRecorder` times the named phases of one pipeline run; :func:`instrument_head` wraps the
head's sub-module methods (``head.sam.encode_image``, ``head.clip.dense_features``,
``head.sam.decode_prompts``, ...) with its timers, so our pipelines are timed inside the real,
unchanged calls. The memory helpers read the process's resident set size and its high-water mark
(VmHWM), which :func:`reset_peak_rss` resets after a model is built.
"""
import collections
import contextlib
import functools
import gc
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List

from .keys import CLIP, FUSION_HEAD, MASK_DECODER, MASK_POSTPROCESS, OTHER, SAM_ENCODER, TIMED_PHASES, TOTAL


class PhaseRecorder:
    """
    Times named phases of one pipeline run. Nested phases are not double counted: only the
    outermost open phase records (so a wrapped method called inside an explicitly timed phase of the
    reference adds nothing of its own). ``sync`` is called at every boundary (a CUDA synchronisation
    on a GPU, nothing on a CPU).
    """

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.times = None
        self.captured = {}
        self._depth = 0

    @contextlib.contextmanager
    def run(self):
        """One pipeline run: yields the dict of phase -> seconds, completed with ``other`` and ``total``."""
        times = collections.defaultdict(float)
        self.times, self.captured, self._depth = times, {}, 0
        self.sync()
        start = time.perf_counter()
        try:
            yield times
        finally:
            self.sync()
            times[TOTAL] = time.perf_counter() - start
            times[OTHER] = max(times[TOTAL] - sum(times[p] for p in TIMED_PHASES), 0.0)
            self.times = None

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.times is None or self._depth > 0:
            yield
            return
        self._depth += 1
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] += time.perf_counter() - start
            self._depth -= 1


def instrument(obj, method: str, recorder: PhaseRecorder, phase: str, capture: str = "") -> None:
    """
    Wrap ``obj.method`` (an instance attribute shadowing the class's method) with a phase timer;
    with ``capture``, the output of the last call inside a run is kept in ``recorder.captured``.
    """
    original = getattr(obj, method)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with recorder.phase(phase):
            out = original(*args, **kwargs)
        if capture and recorder.times is not None:
            recorder.captured[capture] = out
        return out

    setattr(obj, method, wrapper)


def classify(head, region_embeddings):
    """[..., D_t] region embeddings -> [..., C] logits, as the head's own pipelines compute them."""
    return head.classifier(region_embeddings)


def instrument_head(head, recorder: PhaseRecorder) -> None:
    """Time our pipeline's phases inside the real calls (recognize, set_image, predict)."""
    instrument(head.sam, "encode_image", recorder, SAM_ENCODER)
    instrument(head.clip, "image_to_tensor", recorder, CLIP)
    instrument(head.clip, "dense_features", recorder, CLIP)
    instrument(head.sam, "decode_prompts", recorder, MASK_DECODER)
    instrument(head.sam, "postprocess_masks", recorder, MASK_POSTPROCESS)
    instrument(head, "region_embeddings", recorder, FUSION_HEAD)
    # The head calls its classifier module (``classifier(region_embeddings)``, i.e. its forward).
    instrument(head.classifier, "forward", recorder, FUSION_HEAD, capture="logits")


def summarise_runs(runs: List[Dict[str, float]]) -> dict:
    """
    Per-round phase dicts (seconds) of one mode -> ``phases_ms`` (median of the rounds) and
    ``phases_ms_runs`` (every round), in milliseconds; the timed phases a mode never entered are left out.
    """
    keys = [p for p in TIMED_PHASES if any(p in r for r in runs)] + [OTHER, TOTAL]
    phases_runs = {k: [r.get(k, 0.0) * 1000.0 for r in runs] for k in keys}
    phases = {k: statistics.median(v) for k, v in phases_runs.items()}
    return {"phases_ms": phases, "phases_ms_runs": phases_runs}


# ---------------------------------------------------------------------------------------------
# Memory
def _proc_kib_field(path: str, field: str) -> float:
    """A "Field:  N kB" line of a /proc file, in MiB; NaN where it is not there."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def current_rss_mb() -> float:
    """This process's resident set size (VmRSS), MiB."""
    return _proc_kib_field("/proc/self/status", "VmRSS")


def peak_rss_mb() -> float:
    """This process's peak RSS, MiB: VmHWM (reset by :func:`reset_peak_rss`), else getrusage's ru_maxrss."""
    hwm = _proc_kib_field("/proc/self/status", "VmHWM")
    if hwm == hwm:  # not NaN
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_gib() -> float:
    """MemAvailable of /proc/meminfo, GiB (NaN where unknown)."""
    return _proc_kib_field("/proc/meminfo", "MemAvailable") / 1024.0


def start_memory_measurement(device: str) -> dict:
    """
    After a build: the RSS (and on CUDA the allocated GPU memory) now, then the peaks reset, so
    that :func:`finish_memory_measurement` reports the peak while running.
    """
    import torch

    gc.collect()
    mem = {"rss_after_build_mb": current_rss_mb(), "build_peak_rss_mb": peak_rss_mb()}
    if device.startswith("cuda"):
        dev = torch.device(device)
        mem["gpu_mem_after_build_mb"] = torch.cuda.memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
    mem["peak_rss_reset"] = reset_peak_rss()
    return mem


def finish_memory_measurement(device: str, mem: dict) -> dict:
    """Adds the peaks since :func:`start_memory_measurement` and their growth over the after-build values."""
    import torch

    mem["peak_rss_mb"] = peak_rss_mb()
    mem["peak_rss_growth_mb"] = mem["peak_rss_mb"] - mem["rss_after_build_mb"]
    if device.startswith("cuda"):
        dev = torch.device(device)
        mem["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        mem["gpu_peak_growth_mb"] = mem["gpu_peak_mb"] - mem["gpu_mem_after_build_mb"]
    return mem
