"""PEFT export: the expanded adapter reproduces the QA-LoRA model in PEFT, on the dequantized base."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import GROUP, RANK, tiny_qalora, token_batch
from qalora.config import AdapterConfig, QuantConfig
from qalora.errors import ModelError
from qalora.deployment.export.adapter import save_adapter
from qalora.deployment.export.native import save_quantized
from qalora.deployment.export.peft import expand_lora_A, export_dequantized_base, export_peft_adapter
from qalora.method.layer import LowRankOnQuantized, QALoRALinear
from qalora.method.merge import merge_adapters
from qalora.method.layer import set_module

BITS = 3
TOL = 1e-4  # float32: the expanded matmul sums the same products in a different order


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny QA-LoRA model (random non-zero lora_B) with its job-style folders."""
    model, tok = tiny_qalora(bits=BITS)
    root = tmp_path_factory.mktemp("peft")
    adapter = save_adapter(model, root / "adapter", base="tiny-random", quant=QuantConfig(BITS, GROUP),
                           adapter=AdapterConfig(rank=RANK, alpha=2 * RANK, dropout=0.0))
    merged = save_quantized(merge_adapters(copy.deepcopy(model), use_kernel=False), tok, root / "merged")
    with torch.no_grad():
        logits = model(**token_batch()).logits
    return model, tok, adapter, merged, logits


def _dequantized_base(model):
    base = copy.deepcopy(model)
    for name, m in list(base.named_modules()):
        if isinstance(m, LowRankOnQuantized):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight.data = m.quantized().dequantize()
            set_module(base, name, linear)
    return base


def test_expanded_A_equals_pooled_A():
    lora_A = torch.randn(RANK, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 4 * GROUP, generator=torch.Generator().manual_seed(1))
    pooled = x.unflatten(-1, (4, GROUP)).sum(-1)
    torch.testing.assert_close(x @ expand_lora_A(lora_A, GROUP).T, pooled @ lora_A.T, rtol=0, atol=1e-5)


def test_peft_applies_the_adapter_exactly(trained, tmp_path):
    from peft import PeftModel

    model, _, adapter_dir, _, expected = trained
    out = export_peft_adapter(adapter_dir, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == \
        ("LORA", "CAUSAL_LM", RANK, 2 * RANK)
    assert config["base_model_name_or_path"] == "tiny-random"
    assert config["target_modules"] == sorted(AdapterConfig().targets)
    tensors = load_file(out / "adapter_model.safetensors")
    layer = model.model.layers[1].self_attn.k_proj
    key = "base_model.model.model.layers.1.self_attn.k_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (RANK, layer.in_features)
    assert torch.equal(tensors[f"{key}.lora_A.weight"][:, GROUP + 3], layer.lora_A[:, 1].detach())
    assert torch.equal(tensors[f"{key}.lora_B.weight"], layer.lora_B.detach())
    assert "dequantized" in (out / "README.md").read_text()

    peft_model = PeftModel.from_pretrained(_dequantized_base(model), str(out)).eval()
    with torch.no_grad():
        got = peft_model(**token_batch()).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            without = plain(**token_batch()).logits
    assert (got - expected).abs().max().item() < TOL
    assert (without - expected).abs().max().item() > 100 * TOL  # the adapter really is applied


def test_export_from_model_matches_export_from_folder(trained, tmp_path):
    model, _, adapter_dir, _, _ = trained
    from_dir = load_file(export_peft_adapter(adapter_dir, tmp_path / "a") / "adapter_model.safetensors")
    from_model = load_file(export_peft_adapter(model, tmp_path / "b", "tiny-random") / "adapter_model.safetensors")
    assert from_dir.keys() == from_model.keys() and len(from_dir) == 28
    assert all(torch.equal(from_dir[k], from_model[k]) for k in from_dir)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "b" / "adapter_config.json").read_text())


def test_dequantized_base_plus_adapter_is_the_trained_model(trained, tmp_path):
    """The whole user path: exported base folder + exported adapter, loaded by name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, adapter_dir, merged_dir, expected = trained
    base_dir = export_dequantized_base(merged_dir, adapter_dir, tmp_path / "base")
    peft_dir = export_peft_adapter(adapter_dir, tmp_path / "peft", base_model_name_or_path=str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert getattr(base.config, "quantization_config", None) is None
    weight = base.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(weight, model.model.layers[0].mlp.down_proj.quantized().dequantize(),
                               rtol=0, atol=1e-6)
    peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        assert (peft_model(**token_batch()).logits - expected).abs().max().item() < TOL
        merged_float = peft_model.merge_and_unload()
        assert (merged_float(**token_batch()).logits - expected).abs().max().item() < TOL


def test_bad_sources_say_what_to_pass(trained, tmp_path):
    model, tok, adapter_dir, merged_dir, _ = trained
    with pytest.raises(ModelError, match="'adapter' folder"):
        export_peft_adapter(tmp_path, tmp_path / "out")
    peft_dir = export_peft_adapter(adapter_dir, tmp_path / "peft")
    with pytest.raises(ModelError, match="not a QA-LoRA adapter"):
        export_peft_adapter(peft_dir, tmp_path / "out")
    with pytest.raises(ModelError, match="no QA-LoRA layers"):
        export_peft_adapter(_dequantized_base(model), tmp_path / "out")


def test_baseline_adapter_exports_as_plain_lora_and_refuses_base_recovery(tmp_path):
    """The LoRA+PTQ baseline's full-width lora_A is not expanded; PEFT reproduces its model."""
    from peft import PeftModel

    from qalora.method.layer import LoRALinear
    from qalora.models.model import inject_qalora, quantize_model
    from qalora.models.tiny import tiny_random_llama

    model, _ = tiny_random_llama()
    settings = AdapterConfig(rank=RANK, alpha=2 * RANK, dropout=0.0, method="qlora-ptq")
    inject_qalora(model, quantize_model(model, QuantConfig(BITS, GROUP), settings.targets), settings)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14 and not any(isinstance(m, QALoRALinear) for m in model.modules())
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(std=0.05)
        expected = model(**token_batch()).logits
    adapter_dir = save_adapter(model, tmp_path / "adapter", base="tiny-random", quant=QuantConfig(BITS, GROUP),
                               adapter=settings)
    out = export_peft_adapter(adapter_dir, tmp_path / "peft")
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    assert torch.equal(tensors[key], model.model.layers[0].mlp.down_proj.lora_A.detach())  # (r, in) as is
    peft_model = PeftModel.from_pretrained(_dequantized_base(model), str(out)).eval()
    with torch.no_grad():
        assert (peft_model(**token_batch()).logits - expected).abs().max().item() < TOL
    with pytest.raises(ModelError, match="re-quantized"):
        export_dequantized_base(tmp_path / "merged", adapter_dir, tmp_path / "base")
