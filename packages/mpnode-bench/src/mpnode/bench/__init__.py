"""mpnode.bench: profilers and the benchmark suite of torchmpnode.

Profilers (usable from any training script)::

    from mpnode.bench import profile, time_fn, held_memory, count_host_syncs

Benchmarks: ``mpnode-bench run --suite quick`` (or ``python -m mpnode.bench``).
"""

from .profilers import (
    HeldMemory,
    PeakMemory,
    ProfileRecord,
    SyncCount,
    Timing,
    count_host_syncs,
    held_memory,
    peak_memory,
    profile,
    synchronize,
    time_fn,
)

__all__ = [
    "profile",
    "ProfileRecord",
    "time_fn",
    "Timing",
    "held_memory",
    "HeldMemory",
    "count_host_syncs",
    "SyncCount",
    "peak_memory",
    "PeakMemory",
    "synchronize",
]
__version__ = "0.1.0"
