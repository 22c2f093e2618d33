import pytest
import torch

from helpers import DEVICE
from qalora.method.layer import QALoRALinear
from qalora.method.quant import quantize_tensor

OUT, IN, GROUP, RANK = 48, 128, 32, 4


def make_layer(bits=4, dropout=0.0):
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(OUT, IN, device=DEVICE), bits, GROUP)
    return QALoRALinear(qt, None, RANK, alpha=8.0, dropout=dropout), qt


def test_shapes_and_parameter_count():
    layer, _ = make_layer()
    assert layer.lora_A.shape == (RANK, IN // GROUP)
    assert layer.lora_B.shape == (OUT, RANK)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == RANK * IN // GROUP + OUT * RANK
    # The base is stored packed: no float copy of the weight is a parameter or buffer.
    assert {n for n, _ in layer.named_buffers()} == {"packed", "scale", "offset"}
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == OUT * IN // 2


def test_untrained_layer_equals_quantized_base():
    layer, qt = make_layer()
    x = torch.randn(3, 5, IN, device=DEVICE)
    ref = x @ qt.dequantize().t()
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_adapter_matches_explicit_group_sum():
    layer, qt = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, IN, device=DEVICE)
    pooled = torch.stack([x[:, g * GROUP:(g + 1) * GROUP].sum(-1) for g in range(IN // GROUP)], -1)
    ref = x @ qt.dequantize().t() + layer.scaling * pooled @ layer.lora_A.t() @ layer.lora_B.t()
    assert torch.allclose(layer(x), ref, atol=1e-4)


def test_gradients_reach_adapter_and_input_only():
    layer, qt = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, IN, requires_grad=True, device=DEVICE)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    # Input gradient through the packed base equals the dense reference.
    x2 = x.detach().clone().requires_grad_(True)
    w = qt.dequantize()
    pooled = x2.unflatten(-1, (-1, GROUP)).sum(-1)
    ref = x2 @ w.t() + layer.scaling * pooled @ layer.lora_A.detach().t() @ layer.lora_B.detach().t()
    ref.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-3, rtol=1e-4)


def test_backward_saves_packed_weight_not_dense():
    layer, _ = make_layer()
    x = torch.randn(2, IN, requires_grad=True, device=DEVICE)
    saved = []

    def pack_hook(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        layer(x).sum().backward()
    assert (torch.float32, (OUT, IN)) not in saved
    assert (torch.uint8, (OUT, IN // 2)) in saved


def test_bf16_forward_close_to_fp32():
    layer, _ = make_layer()
    x = torch.randn(4, IN, device=DEVICE)
    y32 = layer(x)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


def test_bf16_autocast_runs_forward_and_backward_through_the_packed_function():
    """The CUDA training path (bf16 autocast) traced on the CPU's autocast: the base matmul and
    its backward run in bf16, the adapter trains in fp32, and the result tracks fp32 closely."""
    layer, qt = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 9, IN, requires_grad=True, device=DEVICE)
    ref = layer(x)
    ref.square().mean().backward()
    ref_grad = layer.lora_A.grad.clone()
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x2)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
    assert x2.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.allclose(layer.lora_A.grad, ref_grad, rtol=0.05, atol=0.05 * ref_grad.abs().max().item())


def _reference(layer, qt, x, mask=None):
    """The adapter written out: base matmul plus ``s * B A (mask * pool(x))``, every term explicit."""
    pooled = x.unflatten(-1, (-1, GROUP)).sum(-1)
    if mask is not None:
        pooled = pooled * mask
    return x @ qt.dequantize().t() + layer.scaling * pooled @ layer.lora_A.t() @ layer.lora_B.t()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_layer_and_its_gradients_equal_the_explicit_adapter(dropout):
    """Folded into the dequantized weight (no dropout) or with the pooled dropout term, the layer's
    output and the gradients of x, A and B are the written-out adapter's, to fp32 rounding."""
    layer, qt = make_layer(dropout=dropout)
    layer.train()
    with torch.no_grad():
        layer.lora_B.normal_()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, IN, generator=g).to(DEVICE).requires_grad_(True)
    r = torch.randn(3, 5, OUT, generator=g).to(DEVICE)
    torch.manual_seed(7)
    y = layer(x)
    (y * r).sum().backward()
    got = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad(set_to_none=True)
    mask = None
    if dropout:
        torch.manual_seed(7)  # the layer draws its mask first thing, from the same RNG
        mask = torch.nn.functional.dropout(torch.ones(3, 5, IN // GROUP, device=DEVICE), dropout)
        assert (mask == 0).any() and (mask != 0).any()
    x2 = x.detach().clone().requires_grad_(True)
    ref = _reference(layer, qt, x2, mask)
    (ref * r).sum().backward()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, (x2.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_eval_mode_ignores_dropout():
    layer, qt = make_layer(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    x = torch.randn(4, IN, device=DEVICE)
    assert torch.allclose(layer(x), _reference(layer, qt, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_learned_scale_gradient_equals_autograd_through_the_dequantized_weight(dropout):
    """``dscale[o, g] = sum_{i in g} q[o, i] * (g^T x)[o, i]`` against plain autograd of
    ``x @ (scale * q + offset)^T`` plus the adapter term."""
    from qalora.method.quant import dequantize

    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(OUT, IN, device=DEVICE), 2, GROUP)
    layer = QALoRALinear(qt, None, RANK, alpha=8.0, dropout=dropout, train_scales=True).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.train_scales and {n for n, p in layer.named_parameters()} == {"lora_A", "lora_B", "scale"}
    x = torch.randn(3, 5, IN, device=DEVICE)
    torch.manual_seed(1)
    layer(x).square().sum().backward()
    scale = layer.scale.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # the same dropout mask
    mask = (torch.nn.functional.dropout(torch.ones(3, 5, IN // GROUP, device=DEVICE), dropout) if dropout
            else torch.ones(3, 5, IN // GROUP, device=DEVICE))
    pooled = x.unflatten(-1, (-1, GROUP)).sum(-1) * mask
    ref = x @ dequantize(qt.codes(), scale, layer.offset).t() + pooled @ layer.delta_offset().detach().t()
    ref.square().sum().backward()
    assert torch.allclose(layer.scale.grad, scale.grad, rtol=1e-4, atol=1e-4 * scale.grad.abs().max().item())


def test_a_per_row_factor_gets_the_per_group_gradient_summed_with_the_scales():
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(OUT, IN, device=DEVICE), 2, GROUP)
    group = QALoRALinear(qt, None, RANK, alpha=8.0, train_scales=True)
    row = QALoRALinear(qt, None, RANK, alpha=8.0, train_scales=True, scales_granularity="channel")
    with torch.no_grad():
        row.lora_A.copy_(group.lora_A)
    x = torch.randn(2, 3, IN, device=DEVICE)
    for layer in (group, row):
        layer(x).square().sum().backward()
    assert {n for n, p in row.named_parameters()} == {"lora_A", "lora_B", "channel_scale"}
    want = (group.scale.grad * qt.scale).sum(-1, keepdim=True)  # d(scale * c)/dc = scale, per row
    assert torch.allclose(row.channel_scale.grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_learned_scale_layer_traces_on_meta_without_a_host_tensor():
    """The scale gradient's tensors are made where the layer's are (a CPU tensor meeting a meta
    one raises, as it would meeting a CUDA one)."""
    qt = quantize_tensor(torch.randn(OUT, IN, device="meta"), 3, GROUP)
    layer = QALoRALinear(qt, None, RANK, alpha=8.0, train_scales=True)
    layer(torch.randn(2, 4, IN, device="meta")).sum().backward()
    assert layer.scale.grad.device.type == "meta" and layer.scale.grad.shape == (OUT, IN // GROUP)
