"""
Benchmarking of RegionSpot: the parts of ``tools/benchmark.py`` (and the other ``tools/benchmark_*.py``)
that can be imported and tested.

    keys       the one vocabulary: pipeline (mode), phase and row-field names
    machine    CPU name and matrix features (lscpu first), load average, torch threads and versions
    timing     phase timers wrapping the model's sub-module methods; RSS / GPU memory peaks
    inputs     the variants' random-weight configs, the image, random boxes, the LVIS names
    reference  the pipeline written with the stock segment_anything package, and the agreement of ours with it
    report     JSON payload and the markdown / text tables
    workers    the measurements (compare, memory, throughput, startup), one per process:
               ``python -m regionspot.benchmarking.workers SPEC_JSON OUT_JSON``
"""
from .keys import MEMORY_MODES, MODES, PHASES, TIMED_PHASES
from .machine import cpu_flags, cpu_model, load_average, machine_info, matrix_features, usable_cpus

__all__ = [
    "MEMORY_MODES",
    "MODES",
    "PHASES",
    "TIMED_PHASES",
    "cpu_flags",
    "cpu_model",
    "load_average",
    "machine_info",
    "matrix_features",
    "usable_cpus",
]
