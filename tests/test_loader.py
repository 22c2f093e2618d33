"""Streaming load + quantize: the same codes and logits as quantizing the whole float model,
with at most one decoder layer in float at any time."""
import pytest
import torch
from torch import nn

from helpers import DEVICE
from qalora.config import AdapterConfig, QuantConfig
from qalora.method.quantlinear import QuantLinear
from qalora.models.loader import SafetensorsShards, stream_quantized
from qalora.models.model import load_quantized_base, open_base, quantize_model
from qalora.models.tiny import tiny_random_llama

TARGETS = AdapterConfig().targets
LAYERS = 4


@pytest.fixture
def checkpoint(tmp_path):
    model, tok = tiny_random_llama(num_hidden_layers=LAYERS)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    tok.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2  # really sharded
    return tmp_path, model


def _calib(n=4, t=24):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 250, (1, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_codes_and_logits_equal_whole_model(checkpoint, method):
    path, model = checkpoint
    quant = QuantConfig(4, 32, method)
    calib = _calib() if method == "gptq" else None
    whole = quantize_model(model.to(DEVICE), quant, TARGETS, calib)
    streamed, qweights = stream_quantized(SafetensorsShards(path), model.config, quant, TARGETS, DEVICE,
                                          torch.float32, calib_ids=calib)
    assert set(qweights) == set(whole) and len(whole) == 7 * LAYERS
    for name, qt in whole.items():
        got = qweights[name]
        assert torch.equal(got.packed, qt.packed), name
        assert torch.equal(got.scale, qt.scale) and torch.equal(got.offset, qt.offset), name
    # The streamed model is the quantized base: same logits as the whole model with its linears
    # replaced by the same quantized layers.
    for name, qt in whole.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(qt, None, use_kernel=False))
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, streamed(input_ids=ids).logits)


class _Spy:
    """A tensor source that records how many decoder layers hold float weights at each read."""

    def __init__(self, inner, model):
        self.inner, self.model, self.most = inner, model, 0

    def keys(self):
        return self.inner.keys()

    def get(self, name):
        floats = {n.split(".")[2] for n, m in self.model.named_modules()
                  if type(m) is nn.Linear and ".layers." in n and not m.weight.is_meta}
        self.most = max(self.most, len(floats))
        return self.inner.get(name)


def test_at_most_one_float_layer_at_a_time(checkpoint):
    path, model = checkpoint
    spies = []

    def source(skeleton):
        spies.append(_Spy(SafetensorsShards(path), skeleton))
        return spies[0]

    streamed, _ = stream_quantized(source, model.config, QuantConfig(4, 32), TARGETS, DEVICE, torch.float32)
    assert spies[0].most == 1
    assert not any(type(m) is nn.Linear for n, m in streamed.named_modules() if ".layers." in n)
    assert sum(isinstance(m, QuantLinear) for m in streamed.modules()) == 7 * LAYERS


def test_cached_codes_skip_quantization_and_bf16_keeps_fp32_scales(checkpoint, monkeypatch):
    path, model = checkpoint
    src = open_base(str(path))
    assert src.kind == "safetensors"
    quant = QuantConfig(4, 32)
    _, first = load_quantized_base(src, quant, TARGETS, DEVICE, torch.bfloat16)
    import qalora.models.loader as loader

    monkeypatch.setattr(loader, "quantize_tensor", lambda *a, **k: pytest.fail("quantized again"))
    streamed, again = load_quantized_base(src, quant, TARGETS, DEVICE, torch.bfloat16, cached=first)
    assert all(torch.equal(again[n].offset, first[n].offset) for n in first)
    assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16
    assert streamed.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert {qt.scale.dtype for qt in again.values()} == {torch.float32}


def test_missing_tensor_is_named(checkpoint):
    path, model = checkpoint
    shards = SafetensorsShards(path)
    keys = shards.keys() - {"model.layers.1.mlp.up_proj.weight"}
    monkeypatch_keys = type("S", (), {"keys": lambda self: keys, "get": lambda self, n: shards.get(n)})()
    from qalora.errors import ModelError
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        stream_quantized(monkeypatch_keys, model.config, QuantConfig(4, 32), TARGETS, DEVICE, torch.float32)


@pytest.mark.slow
def test_gguf_streams_the_same_weights_transformers_loads():
    from qalora.models.model import load_base

    src = open_base("default")
    assert src.kind == "gguf"
    quant = QuantConfig(4, 64)
    streamed, qweights = load_quantized_base(src, quant, TARGETS, DEVICE, torch.float32)
    whole, _ = load_base("default", device=DEVICE)
    ref = quantize_model(whole, quant, TARGETS)
    assert set(ref) == set(qweights)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                 "model.layers.29.mlp.down_proj"):
        assert torch.equal(ref[name].packed, qweights[name].packed), name
        assert torch.equal(ref[name].offset, qweights[name].offset), name
    for name, t in whole.state_dict().items():
        if ".layers." not in name:
            assert torch.equal(t, streamed.state_dict()[name]), name
