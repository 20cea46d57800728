"""
Description of the machine a benchmark runs on: CPU name and instruction-set features (``lscpu``
first, then ``/proc/cpuinfo``, then :mod:`platform`), logical / usable CPUs, load average, and the
torch / detectron2 versions and thread count.
"""
import os
import platform
import subprocess
from typing import Dict, List, Optional

# lscpu / /proc/cpuinfo flags of the matrix and vector units that decide the speed of fp32 / bf16 /
# fp16 / int8 matrix products on a CPU, in a stable order (short name -> flag).
MATRIX_FLAGS = (
    ("avx2", "avx2"),
    ("fma", "fma"),
    ("avx512f", "avx512f"),
    ("avx512_vnni", "avx512_vnni"),
    ("avx512_bf16", "avx512_bf16"),
    ("avx512_fp16", "avx512_fp16"),
    ("amx_tile", "amx_tile"),
    ("amx_bf16", "amx_bf16"),
    ("amx_int8", "amx_int8"),
    ("amx_fp16", "amx_fp16"),
)


def _lscpu() -> Dict[str, str]:
    """``lscpu``'s "Key: value" lines as a dict ({} where lscpu is missing or fails)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name`` field of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's ``Model name`` as ``lscpu`` gives it (else /proc/cpuinfo, else platform)."""
    name = _lscpu().get("Model name") or _cpuinfo_field("model name")
    return name or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> List[str]:
    """The CPU's feature flags (``lscpu`` Flags, else /proc/cpuinfo flags); [] where unknown."""
    flags = _lscpu().get("Flags") or _cpuinfo_field("flags") or ""
    return flags.split()


def matrix_features(flags: Optional[List[str]] = None) -> Dict[str, bool]:
    """
    Which matrix / wide-vector units the CPU reports (AVX2, FMA, AVX-512 and its VNNI / BF16 / FP16
    extensions, AMX tiles and their BF16 / INT8 / FP16 units), from ``flags`` or :func:`cpu_flags`.
    """
    present = set(cpu_flags() if flags is None else flags)
    return {name: flag in present for name, flag in MATRIX_FLAGS}


def load_average() -> List[float]:
    """The 1, 5 and 15 minute load averages (rounded to 0.01), [] where the OS has none."""
    if hasattr(os, "getloadavg"):
        return [round(x, 2) for x in os.getloadavg()]
    return []


def usable_cpus() -> Optional[int]:
    """CPUs this process may run on (its affinity), None where the OS does not say."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return None


def machine_info(device: str = "cpu") -> dict:
    """CPU, matrix features, torch threads and versions, and the device's name (a GPU's for cuda)."""
    import torch

    cpu = cpu_model()
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_matrix_features": matrix_features(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": cpu,
        "load_average_at_start": load_average(),
    }
    usable = usable_cpus()
    if usable is not None:
        info["usable_cpus"] = usable
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    try:
        import detectron2

        info["detectron2_version"] = detectron2.__version__
    except ImportError:
        info["detectron2_version"] = None
    return info
