"""Device discipline without a GPU: value-independent code traced on the ``meta`` device.

A tensor the library creates on the CPU while its inputs live elsewhere fails here exactly as it
would on CUDA ("Tensor on device cpu is not on the expected device meta!"), so these tests catch
device mixing on a CPU-only machine. Each also runs on ``QALORA_TEST_DEVICE`` where that is a GPU.
"""
import pytest
import torch
from torch import nn

from helpers import DEVICE, RANK
from qalora.config import AdapterConfig, QuantConfig
from qalora.method.quantlinear import QuantLinear
from qalora.method.layer import LoRALinear, QALoRALinear
from qalora.method.merge import merge_adapters, merged_quantized
from qalora.models.model import inject_qalora, quantize_model
from qalora.method.quant import dequantize, pack_codes, quantize_tensor, unpack_codes
from qalora.models.tiny import tiny_random_llama

OUT, IN, GROUP = 48, 128, 32
DEVICES = ["meta"] + ([str(DEVICE)] if DEVICE.type != "cpu" else [])


@pytest.fixture(params=DEVICES)
def dev(request):
    return torch.device(request.param)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_pack_unpack_stay_on_device(dev, bits):
    w = torch.randn(OUT, IN, device=dev)
    qt = quantize_tensor(w, bits, GROUP)
    assert {t.device for t in (qt.packed, qt.scale, qt.offset)} == {dev}
    assert qt.packed.shape == (OUT, IN * bits // 8) and qt.packed.dtype == torch.uint8
    codes = unpack_codes(qt.packed, bits, IN)
    assert codes.device == dev and codes.shape == (OUT, IN)
    assert pack_codes(codes, bits).device == dev
    assert dequantize(codes, qt.scale, qt.offset).device == dev


@pytest.mark.parametrize("cls", [QALoRALinear, LoRALinear])
def test_adapter_layer_forward_backward_on_device(dev, cls):
    qt = quantize_tensor(torch.randn(OUT, IN, device=dev), 4, GROUP)
    layer = cls(qt, torch.zeros(OUT, device=dev), RANK, alpha=8.0, dropout=0.1)
    assert layer.lora_A.device == dev and layer.lora_B.device == dev
    x = torch.randn(2, 5, IN, device=dev, requires_grad=True)
    y = layer(x)
    assert y.device == dev and y.shape == (2, 5, OUT)
    y.sum().backward()
    assert x.grad.device == dev and layer.lora_A.grad.device == dev and layer.lora_B.grad.device == dev


def test_merge_and_quant_linear_on_device(dev):
    qt = quantize_tensor(torch.randn(OUT, IN, device=dev), 4, GROUP)
    layer = QALoRALinear(qt, None, RANK, alpha=8.0)
    merged = merged_quantized(layer)
    assert merged.offset.device == dev and merged.packed is layer.packed
    out = QuantLinear(merged, None)(torch.randn(3, IN, device=dev))
    assert out.device == dev and out.shape == (3, OUT)


def _tiny_on(dev):
    model, _ = tiny_random_llama()
    if dev.type == "meta":
        with torch.device("meta"):
            return type(model)(model.config)
    return model.to(dev)


def test_injected_tiny_llama_trains_and_merges_on_device(dev):
    model = _tiny_on(dev)
    adapter = AdapterConfig(rank=RANK, alpha=8.0, dropout=0.05)
    inject_qalora(model, quantize_model(model, QuantConfig(3, GROUP), adapter.targets), adapter)
    assert all(p.device == dev for p in model.parameters())
    ids = torch.randint(0, 250, (2, 8)).to(dev)
    logits = model(input_ids=ids).logits  # no attention mask: masks of real values need .item()
    assert logits.device == dev and logits.shape == (2, 8, model.config.vocab_size)
    logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 28 and all(g is not None and g.device == dev for g in grads)
    merge_adapters(model, use_kernel=True)
    assert not any(isinstance(m, QALoRALinear) for m in model.modules())
    assert model(input_ids=ids).logits.device == dev


def test_streamed_load_on_device(dev, tmp_path):
    from qalora.models.loader import SafetensorsShards, stream_quantized

    model, _ = tiny_random_llama()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    adapter = AdapterConfig(rank=RANK)
    streamed, qweights = stream_quantized(SafetensorsShards(tmp_path), model.config, QuantConfig(4, GROUP),
                                          adapter.targets, dev, torch.float32)
    assert len(qweights) == 14
    assert all(t.device == dev for t in [*streamed.parameters(), *streamed.buffers()])
    assert not any(type(m) is nn.Linear for n, m in streamed.named_modules() if ".layers." in n)
    inject_qalora(streamed, qweights, adapter)
    assert streamed(input_ids=torch.zeros(1, 4, dtype=torch.long, device=dev)).logits.device == dev
