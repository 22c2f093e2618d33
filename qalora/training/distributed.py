"""Data-parallel training on torch.distributed: one process per device, launched by ``torchrun``.

Every rank holds the packed base and the adapter; each takes its share of every step's batch;
the adapter's gradients are summed with one explicit all-reduce per optimizer step (a flat buffer
of the trainable parameters only). Not DDP: the adapter is a few MB, so bucketing and the overlap
of communication with backward buy nothing here, and DDP's wrapper would sit between the model
and everything that reads it (merge, checkpoints, the kernels). Rank 0 alone evaluates, writes
checkpoints, the report and the merged model; the others follow its decisions (stop, done).

NCCL on CUDA, gloo on the CPU. A process outside torchrun (no ``WORLD_SIZE``) is a world of one
and none of this costs anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the job (a world of one when torch.distributed is not running)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: torch.device) -> World:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); else a world of one.

    On CUDA each rank takes GPU ``LOCAL_RANK`` of those it sees and NCCL; on the CPU gloo."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    die_with_parent()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=torch.device("cuda", local) if device.type == "cuda" else None)
    return world()


def device_for(device: torch.device, w: World) -> torch.device:
    """The rank's own device: ``cuda:LOCAL_RANK`` on a GPU machine, the CPU otherwise."""
    return torch.device("cuda", w.local_rank) if device.type == "cuda" and w.size > 1 else device


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies (Linux): a rank dies with torchrun, torchrun
    with the worker that started it, so a worker killed with SIGKILL takes its ranks along."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def reduce_step(params: list[torch.nn.Parameter], stats: torch.Tensor) -> torch.Tensor:
    """End a step's backward across ranks: one flat all-reduce sums every trainable parameter's
    gradient and ``stats`` (loss sum, supervised-token count, tokens), then the gradients are
    divided by the global count (each rank backpropagated its own loss sum). Returns the summed
    ``stats``. In a world of one nothing moves: the gradients were scaled by the local count."""
    w = world()
    if w.size == 1:
        return stats
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [stats.float()])
    dist.all_reduce(flat)
    total = flat[-len(stats):]
    count = total[1].clamp_min(1.0)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = (flat[offset:offset + n] / count).view_as(g).to(g.dtype)
        offset += n
    return total


def decide(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, for every rank (a stop asked for on the main rank stops them all)."""
    w = world()
    if w.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag and w.main else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t)
    return bool(t.item())


def barrier() -> None:
    w = world()
    if w.size > 1:
        import torch.distributed as dist
        dist.barrier()


def finish() -> None:
    """Leave the process group (at the end of the run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
