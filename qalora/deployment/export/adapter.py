"""The trained adapter on its own: lora_A/lora_B tensors plus the settings needed to re-apply them.

``method`` says which layer wrote it: ``qalora`` (``lora_A`` is ``(r, in // group_size)`` and sees
group sums) or ``qlora-ptq``, the baseline (``lora_A`` is ``(r, in)``, a plain LoRA). A run with
learned scales also keeps each layer's trained ``<layer>.scale``: the adapter alone does not
reproduce the trained model without them.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from qalora.config import AdapterConfig, QuantConfig
from qalora.method.layer import LowRankOnQuantized

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(model: nn.Module, out_dir, base: str, quant: QuantConfig, adapter: AdapterConfig) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankOnQuantized):
            tensors[f"{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
            tensors[f"{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
            if getattr(m, "train_scales", False):
                tensors[f"{name}.scale"] = m.current_scale().detach().contiguous().cpu()
    save_file(tensors, out / WEIGHTS)
    config = {"adapter_type": "qalora", "base_model": base, "quantization": quant.to_dict(),
              "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
              "target_modules": list(adapter.targets), "group_size": quant.group_size,
              "method": adapter.method, "train_scales": adapter.train_scales}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


def load_adapter_weights(model: nn.Module, adapter_dir) -> int:
    """Copy saved lora_A/lora_B into the model's adapter layers; returns how many layers."""
    import torch
    from safetensors.torch import load_file

    state = load_file(Path(adapter_dir) / WEIGHTS)
    count = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LowRankOnQuantized):
                m.lora_A.copy_(state[f"{name}.lora_A.weight"])
                m.lora_B.copy_(state[f"{name}.lora_B.weight"])
                if f"{name}.scale" in state:
                    m.scale.copy_(state[f"{name}.scale"])  # the scales as trained (a per-row factor included)
                    if getattr(m, "channel_scale", None) is not None:
                        m.channel_scale.fill_(1.0)
                count += 1
    return count
