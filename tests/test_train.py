import math
from contextlib import nullcontext

import pytest
import torch

from helpers import DEVICE, tiny_qalora
from qalora.config import TrainConfig
from qalora.training.loop import latest_checkpoint, lr_multiplier, train

PAD = 256


def examples(n=8, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (t,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (t // 2) + ids[t // 2:]})
    return out


def cfg(**kw):
    base = dict(steps=6, batch_size=2, seq_len=32, lr=5e-3, warmup_steps=1, eval_every=3, save_every=3,
                eval_batches=2, seed=3)
    return TrainConfig(**{**base, **kw})


def fresh_model(dropout=0.1):
    model, _ = tiny_qalora(dropout=dropout, randomize_b=False)
    return model


def test_loss_falls_on_tiny_overfit_set():
    model = fresh_model(dropout=0.0)
    reply = [ord("a")] * 12
    data = [{"input_ids": [i, i + 1] + reply, "labels": [-100, -100] + reply} for i in range(4)]
    result = train(model, data, data, cfg(steps=12, eval_every=12, lr=2e-2), PAD)
    assert len(result.losses) == 12
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert result.eval_losses[12] < 0.3 * result.losses[0]
    # Only the adapter trained: the packed base is untouched by construction (no grads there).
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)


def test_resumed_run_repeats_uninterrupted_losses(tmp_path):
    data, held = examples(), examples(n=4, seed=1)
    full = train(fresh_model(), data, held, cfg(), PAD, ckpt_dir=tmp_path / "a")

    calls = []
    stopped = train(fresh_model(), data, held, cfg(), PAD, ckpt_dir=tmp_path / "b",
                    should_stop=lambda: len(calls) >= 4, on_step=lambda info: calls.append(info.step))
    assert stopped.stopped and stopped.step == 4
    assert latest_checkpoint(tmp_path / "b").name == "step-000004.safetensors"

    torch.manual_seed(12345)  # a different process history must not matter
    steps = []
    resumed = train(fresh_model(), data, held, cfg(), PAD, ckpt_dir=tmp_path / "b",
                    on_step=lambda info: steps.append(info.step))
    assert resumed.resumed_from == 4 and steps == [5, 6]
    assert resumed.losses == full.losses  # bit-identical: same batches, dropout masks, optimizer state
    assert resumed.eval_losses == pytest.approx(full.eval_losses, abs=0)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    train(fresh_model(), examples(), examples(n=2), cfg(steps=9), PAD, ckpt_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-000006.safetensors", "step-000009.safetensors"]
    # Data, not a pickle: tensors in safetensors, everything else JSON in its metadata.
    import json

    from safetensors import safe_open
    with safe_open(str(tmp_path / names[-1]), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        keys = set(f.keys())
    assert state["step"] == 9 and len(state["losses"]) == 9 and state["scheduler"]["last_epoch"] == 9
    assert "rng.torch" in keys and any(k.startswith("optim.") for k in keys)
    assert sum(k.startswith("adapter.") for k in keys) == 28


def test_schedule_warmup_then_cosine():
    c = TrainConfig(steps=10, warmup_steps=2)
    mult = [lr_multiplier(s, c) for s in range(10)]
    assert mult[:2] == [0.5, 1.0]
    assert mult[2] == pytest.approx(1.0)
    assert mult[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert mult == sorted(mult[:2]) + sorted(mult[2:], reverse=True)
    assert lr_multiplier(7, TrainConfig(steps=10, warmup_steps=2, schedule="constant")) == 1.0


def test_gradient_accumulation_matches_bigger_batch():
    data = examples(n=4)
    a = train(fresh_model(0.0), data, [], cfg(steps=2, batch_size=4, grad_accum=1), PAD)
    b = train(fresh_model(0.0), data, [], cfg(steps=2, batch_size=2, grad_accum=2), PAD)
    # Same samples per step, and the loss is the mean over all of the step's supervised tokens
    # however they are split: equal up to summation order.
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


# What reads a device value back to the host (on CUDA each waits for the GPU): ``.item()``,
# ``bool(t)``, ``nonzero`` (and boolean indexing, which calls it). The CPU runs the same code path
# and the profiler records these ops by name.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")


def _step_parts(dropout=0.1):
    from qalora.training.loop import _Order, host_batch, micro_batches

    model = fresh_model(dropout=dropout)
    c = cfg(batch_size=3, grad_accum=2)
    data = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * (n // 2) + list(range(5 + n // 2, 5 + n))}
            for n in (7, 12, 19, 9, 15, 4)]  # lengths differ: every micro-batch has padding
    micro = [host_batch(b, pin=DEVICE.type == "cuda") for b in micro_batches(_Order(len(data), 0), data, c, 0, PAD)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model.train(), micro, params, optimizer, scheduler, c


def _inside(events, event, name: str) -> bool:
    return any(e.name == name and e.time_range.start <= event.time_range.start and event.time_range.end <= e.time_range.end
               for e in events)


def test_a_training_step_reads_nothing_back_from_the_device_but_its_log():
    from torch.profiler import ProfilerActivity, profile

    from qalora.training.loop import optimizer_step

    model, micro, params, optimizer, scheduler, c = _step_parts()
    optimizer_step(model, micro, params, optimizer, scheduler, c, nullcontext())  # warm: optimizer state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, tokens, grad_norm, lr = optimizer_step(model, micro, params, optimizer, scheduler, c, nullcontext())
    events = prof.events()
    counts = {e.key: e.count for e in prof.key_averages()}
    # fused AdamW's CPU kernel reads its step count inside the kernel (its own aten::item); the CUDA
    # kernel reads it on the GPU (the CUDA test below checks that path with the sync debug mode)
    outside = [e.name for e in events if e.name in SYNC_OPS and not _inside(events, e, "aten::_fused_adamw_")]
    assert outside == []
    assert counts["_QALoRAFn"] == 2 * 14 and counts["_LinearCrossEntropy"] == 2  # 14 layers, 2 micro-batches
    assert tokens == 7 + 12 + 19 + 9 + 15 + 4 and 0 < loss < 10 and grad_norm > 0


@pytest.mark.requires_cuda
def test_a_training_step_on_cuda_never_synchronizes_before_its_log():
    from qalora.training.loop import accumulate_gradients

    model, micro, params, optimizer, scheduler, c = _step_parts()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    accumulate_gradients(model, micro, 0.01, DEVICE, autocast)
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        accumulate_gradients(model, micro, 0.01, DEVICE, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_activation_checkpointing_keeps_less_and_computes_the_same_gradients():
    """Per decoder layer, for long sequences: the forward keeps only each layer's input, the
    backward recomputes the rest (dropout masks included), and the gradients are the same."""
    from qalora.training.loop import accumulate_gradients

    grads, kept = {}, {}
    for checkpointing in (False, True):
        model, micro, params, _, _, _ = _step_parts(dropout=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        saved = []
        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            accumulate_gradients(model, micro[:1], 0.01, DEVICE, nullcontext())
        grads[checkpointing] = [p.grad.clone() for p in params]
        kept[checkpointing] = sum(saved)
    assert kept[True] < 0.5 * kept[False]
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_checkpoints_are_pruned_by_step_and_a_fresh_run_starts_clean(tmp_path):
    """Pruning parses the step (1,000,000 follows 999,999); a run that does not resume removes its
    own earlier checkpoints and refuses a folder holding another run's, so the checkpoint it writes
    is never the one pruned (steps 490 and 500 left over, step 10 written: step 10 was deleted)."""
    from qalora.errors import ConfigError
    from qalora.training.loop import checkpoints, prune_checkpoints

    for step in (8, 999_999, 1_000_000):
        (tmp_path / f"step-{step:06d}.safetensors").write_bytes(b"")
    assert [s for s, _ in checkpoints(tmp_path)] == [8, 999_999, 1_000_000]
    prune_checkpoints(tmp_path, tmp_path / "step-1000000.safetensors")
    assert [s for s, _ in checkpoints(tmp_path)] == [999_999, 1_000_000]
    prune_checkpoints(tmp_path, tmp_path / "step-999999.safetensors")  # never one after the written one
    assert [s for s, _ in checkpoints(tmp_path)] == [999_999, 1_000_000]

    run = tmp_path / "run"
    data = examples()
    train(fresh_model(), data, [], cfg(steps=6, save_every=3), PAD, ckpt_dir=run, fingerprint={"run": "a"})
    assert [s for s, _ in checkpoints(run)] == [3, 6]
    again = train(fresh_model(), data, [], cfg(steps=3, save_every=3), PAD, ckpt_dir=run, resume=False,
                  fingerprint={"run": "a"})  # the same run, started over: its old checkpoints go
    assert again.resumed_from == 0 and [s for s, _ in checkpoints(run)] == [3]
    train(fresh_model(), data, [], cfg(steps=6, save_every=3), PAD, ckpt_dir=run, fingerprint={"run": "a"})
    with pytest.raises(ConfigError, match="holds checkpoints of a different run"):
        train(fresh_model(), data, [], cfg(steps=3), PAD, ckpt_dir=run, resume=False, fingerprint={"run": "b"})
    with pytest.raises(ConfigError, match="cannot tell are its own"):
        train(fresh_model(), data, [], cfg(steps=3), PAD, ckpt_dir=run, resume=False)
    assert [s for s, _ in checkpoints(run)] == [3, 6]  # nothing of the other run was touched


def test_a_run_that_no_longer_owns_its_folder_writes_no_checkpoint(tmp_path):
    """``owns()`` false (the job was taken over): neither the periodic checkpoint nor the one a stop
    writes is saved, so nothing of the new owner's is overwritten or pruned."""
    from qalora.training.loop import checkpoints

    done = []
    result = train(fresh_model(), examples(), [], cfg(steps=8, save_every=2), PAD, ckpt_dir=tmp_path,
                   on_step=lambda info: done.append(info.step), owns=lambda: len(done) < 3,
                   should_stop=lambda: len(done) >= 5)
    assert result.stopped and result.step == 5
    assert [s for s, _ in checkpoints(tmp_path)] == [2]


def test_a_resumed_learned_scale_run_repeats_the_uninterrupted_losses_and_scales(tmp_path):
    """The learned scales are in the checkpoint, with their own optimizer group (lr, no weight decay)."""
    def model():
        m, _ = tiny_qalora(dropout=0.1, randomize_b=False, train_scales=True)
        return m

    def scales(m):
        return {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".scale")}

    data, held = examples(), examples(n=4, seed=1)
    settings = cfg(weight_decay=0.1)
    a = model()
    full = train(a, data, held, settings, PAD, ckpt_dir=tmp_path / "a", scales_lr=1e-3)
    calls = []
    b = model()
    start = scales(b)
    train(b, data, held, settings, PAD, ckpt_dir=tmp_path / "b", scales_lr=1e-3,
          should_stop=lambda: len(calls) >= 4, on_step=lambda info: calls.append(info.step))
    torch.manual_seed(12345)
    c = model()
    resumed = train(c, data, held, settings, PAD, ckpt_dir=tmp_path / "b", scales_lr=1e-3)
    assert resumed.resumed_from == 4 and resumed.losses == full.losses
    got, want = scales(c), scales(a)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-4  # they trained
