"""The training loop: AdamW, warmup + cosine/constant schedule, accumulation, clipping,
periodic eval, atomic checkpoints and exact resume.

Exact resume works because nothing about step ``k`` depends on process history: the batch of
step ``k`` is a pure function of ``(seed, k)``, and the checkpoint restores the adapter, the
optimizer, the scheduler and every RNG state (dropout) as they were after step ``k``.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qalora import compiled, memory
from qalora.atomic import atomic_path
from qalora.config import StepInfo, TrainConfig
from qalora.data.records import collate
from qalora.errors import ConfigError
from qalora.evaluation.heldout import eval_loss
from qalora.method.loss import causal_lm_loss, loss_rows
from qalora.training import distributed

CKPT_RE = re.compile(r"step-(\d+)\.safetensors$")
KEEP_CHECKPOINTS = 2


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)          # one per step, step 1 first
    eval_losses: dict[int, float] = field(default_factory=dict)
    step: int = 0
    resumed_from: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False
    position: int | None = 0  # training examples consumed (all ranks): where the next step's batch starts

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class _Order:
    """Sample order: a fresh seeded permutation per epoch, so position ``p`` is deterministic."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch][pos % self.n]


def micro_batches(order: _Order, examples, cfg: TrainConfig, position: int, pad_id: int, rank: int = 0,
                  world_size: int = 1) -> list[dict]:
    """This rank's micro-batches of the step whose batch starts at example ``position``.

    The step's global batch is ``batch_size x grad_accum x world_size`` consecutive examples of the
    order; micro-batch ``j`` of rank ``r`` is slice ``j x world_size + r`` of it. The order is a
    function of the position alone, so a run resumed with another number of processes goes on
    with the examples the interrupted one had not reached."""
    out = []
    for j in range(cfg.grad_accum):
        start = position + (j * world_size + rank) * cfg.batch_size
        out.append(collate([examples[order[p]] for p in range(start, start + cfg.batch_size)], pad_id))
    return out


def host_batch(batch: dict, pin: bool = False) -> dict:
    """A collated CPU batch with what the step needs to know about it, counted on the host before
    anything reaches the device: ``rows`` (the positions that carry a loss, see
    :func:`qalora.method.loss.loss_rows`), ``supervised`` (how many) and ``tokens`` (real, unpadded).
    ``pin``: page-locked tensors, so their copies to a GPU do not wait on it."""
    with torch.profiler.record_function("host_batch"):  # host work on host tensors: profiles tell it apart
        rows = loss_rows(batch["labels"])
        tensors = {"input_ids": batch["input_ids"], "labels": batch["labels"], "rows": rows}
        if pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return {**tensors, "supervised": rows.numel(), "tokens": int(batch["attention_mask"].sum())}


def accumulate_gradients(model, micro: list[dict], scale: float, device: torch.device, autocast) -> torch.Tensor:
    """Forward and backward of every micro-batch of one step (from :func:`host_batch`); each
    backpropagates its loss sum times ``scale``. Returns the step's loss sum, on the device.

    Nothing here reads a device value back: the batch's counts were taken on the host, the loss
    runs SDPA's causal kernel with no mask (right padding needs none), and the loss stays a
    tensor until the step's one read for logging.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    for batch in micro:
        with autocast:
            loss_sum = causal_lm_loss(model, batch["input_ids"].to(device, non_blocking=True),
                                      batch["labels"].to(device, non_blocking=True),
                                      batch["rows"].to(device, non_blocking=True))
        (loss_sum * scale).backward()
        total += loss_sum.detach()
    return total


def optimizer_step(model, micro: list[dict], params, optimizer, scheduler, cfg: TrainConfig, autocast,
                   world_size: int = 1) -> tuple[float, int, float, float]:
    """One optimizer step over this rank's micro-batches (from :func:`host_batch`).

    Returns ``(loss, tokens, grad norm before clipping, learning rate)`` for the log, read from the
    device once, after the optimizer's work is queued: the step's only host synchronisation.
    """
    device = params[0].device
    # The step's loss is the mean over every supervised token of the global batch, however it is
    # split into micro-batches and ranks. In a world of one each part backpropagates its sum over
    # the step's count; with several ranks each backpropagates its sum and the all-reduce of the
    # gradients divides by the global count (so no rank waits for the count before its forward).
    n_local = sum(b["supervised"] for b in micro)
    scale = 1.0 / max(n_local, 1) if world_size == 1 else 1.0
    loss_sum = accumulate_gradients(model, micro, scale, device, autocast)
    # fill kernels, not host-to-device copies: the counts travel as kernel arguments
    stats = torch.stack([loss_sum, loss_sum.new_full((), n_local),
                         loss_sum.new_full((), sum(b["tokens"] for b in micro))])
    stats = distributed.reduce_step(params, stats)
    # each parameter group clipped on its own (learned scales' gradients are not the adapter's size);
    # the adapter's norm is the one logged
    grad_norm = [torch.nn.utils.clip_grad_norm_(g["params"], cfg.max_grad_norm)  # before clipping
                 for g in optimizer.param_groups][0]
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_total, n_step, tokens, grad_norm = torch.cat([stats, grad_norm.float()[None]]).tolist()
    return loss_total / max(n_step, 1.0), int(tokens), grad_norm, lr


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """RNG states as (tensors, JSON-able values): torch's and CUDA's are byte tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    return tensors, {"version": version, "state": list(state), "gauss": gauss}


def _set_rng_state(tensors: dict[str, torch.Tensor], python: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def checkpoints(ckpt_dir) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``ckpt_dir``, by step (parsed: 1,000,000 follows 999,999)."""
    return sorted((int(m.group(1)), p) for p in Path(ckpt_dir).glob("step-*") if (m := CKPT_RE.search(p.name)))


def latest_checkpoint(ckpt_dir) -> Path | None:
    found = checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir, written: Path) -> None:
    """Keep ``written`` and the newest ``KEEP_CHECKPOINTS - 1`` checkpoints before it; never one after
    it (not this process's to judge: a run that starts afresh begins with none, see :func:`train`)."""
    step = int(CKPT_RE.search(written.name).group(1))
    older = [p for s, p in checkpoints(ckpt_dir) if s < step]
    for old in older[:max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
        old.unlink(missing_ok=True)


def start_afresh(ckpt_dir, fingerprint: dict | None) -> None:
    """Before a run that does not resume: remove the checkpoints of this same run (same settings
    and data: starting over was asked for), refuse a folder holding another run's."""
    found = checkpoints(ckpt_dir)
    if not found:
        return
    saved = read_fingerprint(found[-1][1])
    if not saved or not fingerprint or saved != fingerprint:
        check_fingerprint(saved, fingerprint, found[-1][1])  # names what differs, where it can
        raise ConfigError(f"{Path(ckpt_dir)} holds checkpoints (up to step {found[-1][0]}) this run cannot tell "
                          "are its own. Resume them, or use a new output folder (or delete its checkpoints) to "
                          "start afresh.")
    for _, path in found:
        path.unlink(missing_ok=True)


def read_fingerprint(path) -> dict | None:
    """The fingerprint a checkpoint was written with (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("state", "{}")).get("fingerprint")


def check_fingerprint(saved: dict | None, current: dict | None, path) -> None:
    """Refuse to resume a run from checkpoints written for other settings or other data."""
    if not saved or not current or saved == current:
        return
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    shown = "; ".join(f"{k}: was {saved.get(k)!r}, now {current.get(k)!r}" for k in diffs[:4])
    raise ConfigError(f"{Path(path).parent} holds checkpoints of a different run ({shown}). Resume with the "
                      "settings and data it was started with, or use a new output folder (or delete its "
                      "checkpoints) to start afresh.")


def save_checkpoint(ckpt_dir, model, optimizer, scheduler, result: TrainResult, fingerprint: dict | None = None
                    ) -> Path:
    """Write ``step-N.safetensors`` atomically (temp file + rename) and keep the newest few.

    Data, not a pickle: the adapter, the optimizer's state tensors and the RNG states are
    tensors; the step, losses, scheduler and optimizer settings, Python's RNG state and the
    fingerprint are JSON in the file's metadata.
    """
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{result.step:06d}.safetensors"
    tensors = {f"adapter.{n}": p.detach().cpu().contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for idx, values in opt["state"].items():
        for key, value in values.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    rng_tensors, python_rng = _rng_state()
    tensors.update(rng_tensors)
    state = {"step": result.step, "losses": result.losses,
             "eval_losses": {str(k): v for k, v in result.eval_losses.items()}, "tokens": result.tokens,
             "seconds": result.seconds, "position": result.position, "scheduler": scheduler.state_dict(),
             "param_groups": opt["param_groups"],
             "python_rng": python_rng, "fingerprint": fingerprint}
    with atomic_path(path, durable=True) as tmp:
        save_file(tensors, tmp, metadata={"state": json.dumps(state)})
    prune_checkpoints(ckpt_dir, path)
    return path


def load_checkpoint(path, model, optimizer, scheduler, fingerprint: dict | None = None) -> TrainResult:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    check_fingerprint(state.get("fingerprint"), fingerprint, path)
    params = dict(model.named_parameters())
    optim_state: dict[int, dict] = {}
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("adapter."):
                params[key[len("adapter."):]].copy_(value)
            elif key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                optim_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(tensors, state["python_rng"])
    return TrainResult(losses=list(state["losses"]), eval_losses={int(k): v for k, v in state["eval_losses"].items()},
                       step=state["step"], resumed_from=state["step"], tokens=state["tokens"],
                       seconds=state["seconds"], position=state.get("position"))  # None: see train()


def _optimizer(model, cfg: TrainConfig, scales_lr: float | None):
    """AdamW over the model's trainable parameters and its warmup schedule: ``(optimizer, scheduler,
    params)``. Learned scales (``*.scale``, or ``*.channel_scale`` per row) are a second parameter
    group at ``scales_lr``, with no weight decay."""
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = [p for n, p in named if n.endswith("scale")]  # per group (.scale) or per row (.channel_scale)
    groups = [{"params": [p for n, p in named if not n.endswith("scale")]}]
    if scales:
        groups.append({"params": scales, "lr": scales_lr or cfg.lr, "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    # fused: one kernel for all parameters, and its step counts stay on the device (no host reads)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    return optimizer, scheduler, params


def _starting_point(model, optimizer, scheduler, cfg: TrainConfig, ckpt_dir, resume: bool, fingerprint: dict | None,
                    log) -> TrainResult:
    """Where training starts: step 0 (this run's old checkpoints removed first when not resuming),
    or the newest checkpoint with the adapter, optimizer, scheduler and RNG states it holds."""
    w = distributed.world()
    torch.manual_seed(cfg.seed + w.rank)  # dropout masks: each rank its own
    result = TrainResult()
    if not resume and ckpt_dir and w.main:
        start_afresh(ckpt_dir, fingerprint)
    if resume and ckpt_dir and (path := latest_checkpoint(ckpt_dir)):
        result = load_checkpoint(path, model, optimizer, scheduler, fingerprint)
        if w.rank:  # the checkpoint holds rank 0's RNG; the others draw their own masks
            torch.manual_seed(cfg.seed + w.rank + 7919 * result.step)
        if log:
            log.info("resumed from %s (step %d)", path.name, result.step)
    if result.position is None:  # a checkpoint written before multi-process training: one process
        result.position = result.step * cfg.batch_size * cfg.grad_accum
    return result


def _train_step(model, order: _Order, examples: list[dict], cfg: TrainConfig, pad_id: int, params, optimizer,
                scheduler, autocast, result: TrainResult) -> tuple[float, int, float, float, float]:
    """Train the step after ``result.step`` on this rank's share of its batch and count it in
    ``result``. Returns ``(loss, tokens, grad norm, learning rate, seconds)``."""
    w, device = distributed.world(), next(model.parameters()).device
    t0 = time.perf_counter()
    micro = [host_batch(b, pin=device.type == "cuda")
             for b in micro_batches(order, examples, cfg, result.position, pad_id, w.rank, w.size)]
    loss, tokens, grad_norm, lr = optimizer_step(model, micro, params, optimizer, scheduler, cfg, autocast, w.size)
    dt = time.perf_counter() - t0
    result.step += 1
    result.position += cfg.batch_size * cfg.grad_accum * w.size
    result.losses.append(loss)
    result.tokens += tokens
    result.seconds += dt
    return loss, tokens, grad_norm, lr, dt


def _due(step: int, every: int, cfg: TrainConfig) -> bool:
    """Whether something done every ``every`` steps (and after the last) is due after ``step``."""
    return step % every == 0 or step == cfg.steps


def _report_step(result: TrainResult, cfg: TrainConfig, loss: float, lr: float, tokens: int, dt: float,
                 ev: float | None, grad_norm: float, world_size: int, log, on_step) -> None:
    """The step's log line and ``on_step(StepInfo)``."""
    if log:
        log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s%s", result.step, cfg.steps, loss, lr,
                 tokens / dt, "" if ev is None else f" eval {ev:.4f}")
    if on_step:
        on_step(StepInfo(result.step, cfg.steps, loss, lr, tokens / dt, result.seconds, ev,
                         tokens_seen=result.tokens, extra={"grad_norm": grad_norm, "world_size": world_size}))


def train(model, train_examples: list[dict], eval_examples: list[dict], cfg: TrainConfig, pad_id: int, *,
          ckpt_dir=None, resume: bool = True, on_step=None, should_stop=None, log=None,
          fingerprint: dict | None = None, owns=None, scales_lr: float | None = None) -> TrainResult:
    """Train the model's trainable parameters for ``cfg.steps`` optimizer steps.

    ``on_step(StepInfo)`` runs after each step; ``should_stop()`` is checked after each step
    and, when true, a checkpoint is written and the loop returns with ``stopped=True``.
    ``owns()``, asked before each checkpoint, says whether this process still owns ``ckpt_dir``: a
    job taken over by another worker writes (and prunes) nothing in the new owner's folder.
    ``fingerprint`` (settings and data identity) is stored in every checkpoint; resuming from
    checkpoints with a different one raises ``ConfigError``. Learned scales (trainable parameters
    named ``*.scale``, or ``*.channel_scale`` per row) are a second parameter group at
    ``scales_lr``, with no weight decay.
    """
    w = distributed.world()
    device = next(model.parameters()).device
    optimizer, scheduler, params = _optimizer(model, cfg, scales_lr)
    result = _starting_point(model, optimizer, scheduler, cfg, ckpt_dir, resume, fingerprint, log)
    main = w.main
    ckpt_dir = ckpt_dir if main else None  # rank 0 alone writes checkpoints
    eval_examples = eval_examples if main else []  # and evaluates
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    may_write = owns or (lambda: True)
    order = _Order(len(train_examples), cfg.seed)
    model.train()
    # compiled decoder layers for this loop only (qalora.compiled; QALORA_COMPILE=0 keeps it eager),
    # and on the CPU freed heap handed back during each forward (qalora.memory)
    with (compiled.decoder_layers_compiled(model, device, cfg.steps - result.step),
          memory.released_between_layers(model, device)):
        while result.step < cfg.steps:
            loss, tokens, grad_norm, lr, dt = _train_step(model, order, train_examples, cfg, pad_id, params,
                                                          optimizer, scheduler, autocast, result)
            ev = None
            if eval_examples and _due(result.step, cfg.eval_every, cfg):
                with autocast:
                    ev = eval_loss(model, eval_examples, cfg.batch_size, pad_id, cfg.eval_batches)
                result.eval_losses[result.step] = ev
            if main:
                _report_step(result, cfg, loss, lr, tokens, dt, ev, grad_norm, w.size, log, on_step)
            # after on_step: a step in a checkpoint has been reported (recorded) too, so a run killed in
            # between resumes without a hole in its recorded steps (it re-trains and re-records the step)
            if ckpt_dir and _due(result.step, cfg.save_every, cfg) and may_write():
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, result, fingerprint)
            if result.step < cfg.steps and distributed.decide(bool(should_stop and main and should_stop()), device):
                if ckpt_dir and result.step % cfg.save_every and may_write():
                    save_checkpoint(ckpt_dir, model, optimizer, scheduler, result, fingerprint)
                result.stopped = True
                break
    model.eval()
    return result
