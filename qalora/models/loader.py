"""Stream a LLaMA-family checkpoint into a quantized model, one decoder layer at a time.

The float model is never whole in memory: the skeleton is built on ``meta``; embeddings, norms
and the head are read from the checkpoint onto the target device; then each decoder layer is
read in float, its target linears are quantized (RTN, or GPTQ fed the previous layers'
outputs) and replaced by packed :class:`~qalora.method.quantlinear.QuantLinear` layers before the next
layer is read. Peak memory is the packed model, the embeddings and head, one float layer and
a fixed overhead (accelerate's ``init_empty_weights`` + bitsandbytes' quantize-on-load, done
for our format).

Sources: a folder of ``*.safetensors`` shards (with or without ``model.safetensors.index.json``)
and a ``.gguf`` file (tensors dequantized one at a time through gguf-py, names and the q/k
permutation mapped as transformers' GGUF loader does).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qalora.config import QuantConfig, check_group_size
from qalora.errors import ModelError
from qalora.memory import release_freed_memory
from qalora.method.layer import set_module
from qalora.method.quant import QuantizedTensor, from_codes, quantize_tensor
from qalora.method.quantlinear import QuantLinear, set_compute_dtype

LAYERS_PREFIX = "model.layers."


class SafetensorsShards:
    """Tensors of a safetensors checkpoint folder, read one at a time.

    Each read opens its shard and closes it again: a shard left open keeps every page read from
    it mapped into the process, and the resident size would grow to the whole checkpoint.
    """

    def __init__(self, directory):
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.directory} has no .safetensors files; save the model with "
                             "save_pretrained(safe_serialization=True) or give a .gguf file.")
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self._where = {k: self.directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            self._where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as reader:
                    self._where.update({key: f for key in reader.keys()})

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as reader:
            return reader.get_tensor(name)


class GGUFTensors:
    """Tensors of a GGUF file under transformers' names, dequantized one at a time to float32."""

    def __init__(self, path, model: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self.reader = GGUFReader(str(path))
        arch = read_field(self.reader, "general.architecture")[0]
        cfg = model.config
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads})
        names = get_gguf_hf_weights_map(model, self.processor)
        self._tensors = {names[t.name]: t for t in self.reader.tensors if t.name in names}

    def keys(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._tensors[name]
        weights = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type),
                                         name=tensor.name).weights
        if not (weights.flags.writeable and weights.flags.c_contiguous):  # a view of the read-only map
            weights = np.array(weights, order="C")
        return torch.from_numpy(weights)


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with every tensor on ``meta`` (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of parameter or buffer ``name`` (frozen)."""
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def materialize_buffers(model: nn.Module, config, device) -> None:
    """Non-persistent buffers (rotary frequencies) were created on meta; rebuild them for real."""
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            with torch.device(device):
                fresh = type(module)(config=config)
            set_module(model, name, fresh)


def stream_quantized(source, config, quant: QuantConfig, targets, device, dtype: torch.dtype, *,
                     calib_ids=None, cached: dict[str, QuantizedTensor] | None = None,
                     on_progress=None) -> tuple[nn.Module, dict[str, QuantizedTensor]]:
    """Build the model from ``source`` (``SafetensorsShards`` or ``GGUFTensors``) layer by layer.

    Returns ``(model, qweights)``: the model's target linears are frozen ``QuantLinear`` layers
    on ``device`` holding ``qweights`` (the same tensors, not copies); everything else is in
    ``dtype``. ``cached`` (from an earlier attempt) skips quantization for the layers it names.
    ``on_progress(done, total)`` is called after each decoder layer.
    """
    device = torch.device(device)
    model = source_model = empty_model(config, dtype)
    if callable(source):
        source = source(source_model)
    names = source.keys()
    layers = model.model.layers
    by_layer: list[list[str]] = [[] for _ in layers]
    top = []
    for name in model.state_dict():
        if name.startswith(LAYERS_PREFIX):
            by_layer[int(name[len(LAYERS_PREFIX):].split(".", 1)[0])].append(name)
        else:
            top.append(name)
    tied = getattr(config, "tie_word_embeddings", False)
    for name in top:
        if name == "lm_head.weight" and tied:
            continue
        _load(model, source, names, name, device, dtype)
    if tied:
        model.tie_weights()
    materialize_buffers(model, config, device)

    cached = cached or {}
    gptq = quant.method == "gptq" and not all(_targets_of(model, i, targets) and
                                              set(_targets_of(model, i, targets)) <= set(cached)
                                              for i in range(len(layers)))
    inputs = _calibration_inputs(model, layers[0], calib_ids) if gptq else None
    qweights: dict[str, QuantizedTensor] = {}
    for i, layer in enumerate(layers):
        layer_dtype = torch.float32 if gptq else dtype
        for name in by_layer[i]:
            _load(model, source, names, name, device, layer_dtype)
        found = _targets_of(model, i, targets)  # RTN checks each group size in quantize_rtn, GPTQ in _gptq_layer
        if gptq:
            qt_layer, inputs = _gptq_layer(model, layer, found, quant, inputs)
        else:
            qt_layer = {n: cached.get(n) or quantize_tensor(model.get_submodule(n).weight.data, quant.bits,
                                                            quant.group_size, n, quant.clip) for n in found}
        for name, qt in qt_layer.items():
            qt = qweights[name] = qt.to(device)
            set_module(model, name, QuantLinear(qt, model.get_submodule(name).bias, use_kernel=False))
        if layer_dtype != dtype:
            set_compute_dtype(layer, dtype)  # norms back to dtype; scales and offsets stay fp32
        release_freed_memory()  # the float layer's temporaries go back to the system
        if on_progress:
            on_progress(i + 1, len(layers))
    return model, qweights


def _load(model, source, names, name, device, dtype) -> None:
    if name not in names:
        if name.endswith("rotary_emb.inv_freq"):
            return
        raise ModelError(f"the checkpoint has no tensor {name!r} that its config implies; the files "
                         "are incomplete or belong to another model.")
    value = source.get(name)
    assign(model, name, value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype))


def _targets_of(model, i: int, targets) -> list[str]:
    prefix = f"{LAYERS_PREFIX}{i}."
    return [prefix + n for n, m in model.model.layers[i].named_modules()
            if n.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]


def _calibration_inputs(model, first_layer, calib_ids):
    from qalora.method.gptq import _check_calibration, capture_layer_inputs

    _check_calibration(calib_ids)
    with torch.no_grad():
        return capture_layer_inputs(model, first_layer, calib_ids)


def _gptq_layer(model, layer, found, quant: QuantConfig, inputs):
    from qalora.method.gptq import gptq_config, gptq_quantize_layer

    for n in found:
        check_group_size(model.get_submodule(n).in_features, quant.group_size, n)
    names = {id(model.get_submodule(n)): n for n in found}
    with torch.no_grad():
        raw, inputs = gptq_quantize_layer(layer, inputs, names, gptq_config(quant.bits, quant.group_size, clip=quant.clip),
                                          quant.bits)
    return {n: from_codes(*(t.clone() for t in raw[n]), quant.bits) for n in found}, inputs
