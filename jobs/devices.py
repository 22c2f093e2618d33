"""Which devices a worker owns, and how the app splits a machine's GPUs among its workers.

A worker owns the GPUs it was started with (``CUDA_VISIBLE_DEVICES``); when the app starts
``QALORA_WORKERS=N`` workers it gives each a contiguous share of the machine's GPUs. A worker
claims only jobs that ask for at most as many devices as it owns. On a machine without GPUs a
worker owns ``QALORA_WORKER_DEVICES`` CPU processes (default 1): a job asking for 2 then trains
as 2 gloo processes (how the tests run multi-process jobs without a GPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpus(env=None) -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else those ``nvidia-smi``
    lists, else none. (No torch import: the web process calls this.)"""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is not None:
        return [d.strip() for d in raw.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def split(gpus: list[str], workers: int) -> list[list[str]]:
    """``workers`` contiguous, as-even-as-possible shares of ``gpus`` (none when there are no GPUs);
    never more shares than GPUs: a worker without a device would have nothing to run on."""
    if not gpus:
        return [[] for _ in range(workers)]
    n = min(workers, len(gpus))
    size, extra = divmod(len(gpus), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(gpus[start:end])
        start = end
    return out


def capacity(env=None) -> int:
    """How many devices this worker owns: its visible GPUs, or ``QALORA_WORKER_DEVICES`` CPU processes."""
    env = os.environ if env is None else env
    gpus = visible_gpus(env)
    if gpus:
        return len(gpus)
    raw = env.get("QALORA_WORKER_DEVICES") or "1"
    try:
        return max(1, int(raw))
    except ValueError:
        from qalora.errors import ConfigError
        raise ConfigError(f"QALORA_WORKER_DEVICES={raw!r} is not a whole number; unset it or give e.g. 2.") from None
