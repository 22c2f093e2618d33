"""Peak memory of one piece of work, not of the process's whole life.

``getrusage``'s ``ru_maxrss`` never goes down, so a worker that ran a big job reports that peak
for every later job. Linux lets a process reset its own high-water mark (``VmHWM``) by writing
``5`` to ``/proc/self/clear_refs``; CUDA's allocator keeps its own resettable peak.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from typing import Iterator

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


MB = 1e6  # the app states sizes in MB of 10^6 bytes, as disks and the Hub do


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last :func:`reset_peak` (process lifetime where unsupported)."""
    kb = _status_kb("VmHWM")  # the kernel's "kB" are KiB
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 / MB


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024 / MB


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory (MB) allocated by PyTorch since the last reset; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / MB


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


TRIMS_PER_FORWARD = 4


@contextlib.contextmanager
def released_between_layers(model, device) -> Iterator[int]:
    """While a model trains on the CPU, hand freed heap back to the OS a few times per forward.

    A forward frees many temporaries (dequantized weights, norm and rotary intermediates) between
    the activations it keeps for backward; glibc keeps the holes they leave, so resident memory
    grows past what is alive: 450-550 MB of holes at the end of a forward of the default model at
    batch 16 (about 1,300 tokens, fp32). :func:`release_freed_memory` after 4 of its 30 decoder
    layers (evenly spread, the last among them) took the fine-tune's peak from 2.26 GB to
    1.93-1.96 GB (``bench/memory.py``); the pages it releases are faulted in again when reused,
    which cost the bf16 step of ``bench/train_step.py`` 3-8%. On CUDA nothing is done (PyTorch's
    caching allocator owns GPU memory). Yields how many layers trim.
    """
    from qalora.compiled import decoder_layers

    layers = decoder_layers(model) if torch.device(device).type == "cpu" else []
    n = len(layers)
    at = sorted({-(-(k + 1) * n // TRIMS_PER_FORWARD) - 1 for k in range(TRIMS_PER_FORWARD)} if n else set())
    handles = [layers[i].register_forward_hook(_trim_hook) for i in at]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


@torch.compiler.disable
def _trim_hook(module, args, output) -> None:
    release_freed_memory()
