"""Compiled decoder layers against the eager reference, and the switch that turns compiling off."""
import copy
from contextlib import nullcontext

import pytest
import torch

from helpers import DEVICE
from qalora import compiled
from qalora.errors import ConfigError
from test_train import SYNC_OPS, _inside, _step_parts


def test_the_switch(monkeypatch):
    monkeypatch.setenv("QALORA_COMPILE", "auto")
    assert compiled.enabled("cuda") and compiled.enabled("cpu", steps=100)
    assert not compiled.enabled("cpu", steps=compiled.MIN_STEPS - 1)  # compiling would cost more than it saves
    assert not compiled.enabled("cpu")  # decoding on the CPU: a first reply must not wait for a compile
    assert compiled.enabled("cuda", steps=5) and not compiled.enabled("meta")
    monkeypatch.setenv("QALORA_COMPILE", "0")
    assert not compiled.enabled("cuda") and not compiled.enabled("cpu", steps=10_000)
    monkeypatch.setenv("QALORA_COMPILE", "1")
    assert compiled.enabled("cpu", steps=1)
    monkeypatch.setenv("QALORA_COMPILE", "yes")
    with pytest.raises(ConfigError, match="QALORA_COMPILE='yes' is not one of auto, 0, 1"):
        compiled.enabled("cpu")


def test_compiled_steps_equal_eager_steps_and_read_nothing_back(monkeypatch):
    """Three optimizer steps with compiled decoder layers give the eager steps' losses and adapter
    weights (fp32, to rounding), read no device value back, and leave the layers eager afterwards."""
    from torch.profiler import ProfilerActivity, profile

    from qalora.training.loop import optimizer_step

    model, micro, params, optimizer, scheduler, c = _step_parts(dropout=0.0)
    twin = copy.deepcopy(model)
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    twin_opt = torch.optim.AdamW(twin_params, lr=1e-3, fused=True)
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda s: 1.0)
    eager = [optimizer_step(twin, micro, twin_params, twin_opt, twin_sched, c, nullcontext())[0] for _ in range(3)]

    monkeypatch.setenv("QALORA_COMPILE", "1")
    with compiled.decoder_layers_compiled(model, DEVICE) as n:
        assert n == 2
        fast = [optimizer_step(model, micro, params, optimizer, scheduler, c, nullcontext())[0] for _ in range(2)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fast.append(optimizer_step(model, micro, params, optimizer, scheduler, c, nullcontext())[0])
    events = prof.events()
    assert any("CompiledFunction" in e.name for e in events)  # the step really ran the compiled layers
    assert [e.name for e in events if e.name in SYNC_OPS and not _inside(events, e, "aten::_fused_adamw_")] == []
    assert fast == pytest.approx(eager, rel=1e-5)
    for a, b in zip(params, twin_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(layer._compiled_call_impl is None for layer in compiled.decoder_layers(model))
