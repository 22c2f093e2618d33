"""Exact merge of QA-LoRA adapters into the quantized weights, and its verification.

The adapter adds ``s * (B @ A)[o, g] * sum_{i in g} x_i`` to output ``o``: the same as adding
``s * (B @ A)[o, g]`` to every weight of group ``g``. Since ``w = scale * q + offset``, that is
``offset += s * B @ A`` with the codes ``q`` untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from qalora.method.layer import QALoRALinear, set_module
from qalora.method.quant import QuantizedTensor
from qalora.method.quantlinear import QuantLinear


def merged_quantized(layer: QALoRALinear) -> QuantizedTensor:
    """The layer's quantized weight with the adapter folded into the offsets (same codes)."""
    with torch.no_grad():
        offset = (layer.offset.float() + layer.delta_offset()).to(layer.offset.dtype)
        scale = layer.current_scale().detach().contiguous()
    return QuantizedTensor(layer.packed, scale, offset.contiguous(), layer.bits, layer.group_size,
                           layer.in_features)


def merge_adapters(model: nn.Module, use_kernel: bool = True, on_progress=None) -> nn.Module:
    """Replace every ``QALoRALinear`` in ``model`` (in place) with a merged ``QuantLinear``.

    ``on_progress(done, total)`` is called after each layer.
    """
    names = [n for n, m in model.named_modules() if type(m) is QALoRALinear]
    for i, name in enumerate(names, 1):
        layer = model.get_submodule(name)
        set_module(model, name, QuantLinear(merged_quantized(layer), layer.bias, use_kernel=use_kernel))
        if on_progress:
            on_progress(i, len(names))
    return model


def use_kernels(model: nn.Module, on: bool = True) -> str:
    """Switch every ``QuantLinear`` to the int4 kernel (``on``) or the dequantize reference.

    Returns the path the model's layers now take: "int4 kernel", "dequantize" or "mixed".
    """
    paths = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_kernel = on
            paths.add(m.kernel_active(m.packed.device))
    return "mixed" if len(paths) > 1 else "int4 kernel" if paths == {True} else "dequantize"


@torch.no_grad()
def max_logit_diff(model_a: nn.Module, model_b: nn.Module, batches) -> float:
    """Max ``|logits_a - logits_b|`` over the real (unpadded) tokens of ``batches``."""
    worst = 0.0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        la = model_a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lb = model_b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        worst = max(worst, (la - lb).abs()[mask].max().item())
    return worst
