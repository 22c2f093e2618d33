"""The lean gated-MLP activation against autograd's own ``silu(gate) * up``."""
import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, tiny_qalora
from qalora.method.mlp import lean_gated_mlps, silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_and_its_gradients_equal_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(5, 7, 96, generator=g) * 3).to(DEVICE, dtype).requires_grad_(True)
    up = torch.randn(5, 7, 96, generator=g).to(DEVICE, dtype).requires_grad_(True)
    r = torch.randn(5, 7, 96, generator=g).to(DEVICE, dtype)
    ref = F.silu(gate) * up
    (ref * r).sum().backward()
    want = (gate.grad.clone(), up.grad.clone())
    gate.grad = up.grad = None
    got = silu_mul(gate, up)
    (got * r).sum().backward()
    assert torch.equal(got, ref)  # the same ops in the same dtype
    for a, b in zip((gate.grad, up.grad), want):
        assert a.dtype == dtype and torch.equal(a, b)


def test_every_gated_mlp_keeps_two_activations_and_computes_the_same():
    model, _ = tiny_qalora()
    saved = []
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, device=DEVICE, requires_grad=True)
    inter = torch.Size([2, 9, model.config.intermediate_size])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        before = type(mlp).forward(mlp, x)  # transformers' own forward
        kept_before = saved.count(inter)
        after = mlp(x)  # the lean one inject_qalora gave it
    assert (kept_before, saved.count(inter) - kept_before) == (3, 2)  # silu(gate) is no longer kept
    assert torch.equal(before, after) and lean_gated_mlps(model) == model.config.num_hidden_layers
    assert model(input_ids=ids).logits.isfinite().all()
