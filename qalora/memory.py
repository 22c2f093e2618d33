"""Peak memory of one piece of work, not of the process's whole life.

``getrusage``'s ``ru_maxrss`` never goes down, so a worker that ran a big job reports that peak
for every later job. Linux lets a process reset its own high-water mark (``VmHWM``) by writing
``5`` to ``/proc/self/clear_refs``; CUDA's allocator keeps its own resettable peak.
"""
from __future__ import annotations

import ctypes
import os
import resource

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_MMAP_THRESHOLD = 8 * 2 ** 20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Start a new peak for RSS (where Linux allows it) and for CUDA; returns whether RSS reset."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak` (process lifetime where unsupported)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by PyTorch since the last reset; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 20


def release_freed_memory() -> None:
    """Hand freed heap back to the OS now (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def limit_heap_retention(threshold: int | None = None) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping (glibc only).

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, after which
    the dequantized weights a training step allocates and frees (2-46 MB each on a 1B model) land
    on the heap, whose freed holes are kept by the process. Measured by bench/memory.py on a 1.1B
    model (training stage, 2 steps and 2 evals): peak RSS 2.63 GB / 25 s with glibc's default,
    2.54 GB / 25 s at 16 MiB, 2.15 GB / 29 s at 8 MiB (the default here), 2.13 GB / 31 s at
    4 MiB; each mapping is zeroed by the kernel on first touch, hence the time. Process-wide, so only
    the process owners call it: the CLI, the job worker, the benchmarks. ``QALORA_MMAP_THRESHOLD``
    (bytes; 0 keeps glibc's own behaviour) overrides the default. Returns whether it applied.
    """
    if threshold is None:
        threshold = int(os.environ.get("QALORA_MMAP_THRESHOLD", HEAP_MMAP_THRESHOLD))
    if threshold <= 0:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
