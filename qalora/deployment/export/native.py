"""Our native low-bit checkpoint: packed codes, float scales and offsets in safetensors.

Layout of a directory::

    config.json          the transformers config plus ``quantization_config``
    model.safetensors    ``<layer>.packed`` (uint8), ``<layer>.scale``, ``<layer>.offset`` for
                         each quantized linear (scale and offset fp32: the merge adds the adapter
                         to the offsets, and fp16 would round what was trained); the token
                         embedding and an untied output head in 8 bits, ggml's Q8_0
                         (``<name>.q8_0`` int8 codes, ``<name>.q8_0_scale`` fp16 per 32 values: the
                         values the model was trained with, see ``qalora.models.model.EIGHT_BIT``); every
                         other tensor (norms, biases) in its float dtype
    tokenizer files
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qalora.errors import ModelError
from qalora.method.layer import set_module
from qalora.method.quant import QuantizedTensor, dequantize_q8_0, q8_0_fits, quantize_q8_0
from qalora.method.quantlinear import QuantLinear, set_compute_dtype
from qalora.models.loader import materialize_buffers
from qalora.models.model import EIGHT_BIT

FORMAT = "qalora"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
Q8_CODES, Q8_SCALES = ".q8_0", ".q8_0_scale"


def eight_bit_parts(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """How the file stores tensor ``name``: its Q8_0 codes and scales where it is one of
    :data:`qalora.models.model.EIGHT_BIT`, else itself."""
    if name in EIGHT_BIT and q8_0_fits(t):
        codes, d = quantize_q8_0(t)
        return {name + Q8_CODES: codes, name + Q8_SCALES: d}
    return {name: t}


def logical_keys(keys) -> list[str]:
    """The file's tensor names with each 8-bit pair named as the one weight it stores."""
    return [k.removesuffix(Q8_CODES) for k in keys if not k.endswith(Q8_SCALES)]


def q8_0_of(f, name: str):
    """``(codes, scales)`` of an 8-bit tensor in an open safetensors file ``f``, or None."""
    if name + Q8_CODES not in set(f.keys()):
        return None
    return f.get_tensor(name + Q8_CODES), f.get_tensor(name + Q8_SCALES)


def get_float(f, name: str) -> torch.Tensor:
    """Tensor ``name`` of an open file, an 8-bit one dequantized to fp32."""
    parts = q8_0_of(f, name)
    return dequantize_q8_0(*parts) if parts else f.get_tensor(name)


def float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded file's tensors with each 8-bit pair dequantized to fp32 under its weight's name."""
    out = {}
    for key, t in state.items():
        if key.endswith(Q8_CODES):
            name = key.removesuffix(Q8_CODES)
            out[name] = dequantize_q8_0(t, state[name + Q8_SCALES]).to(t.device)
        elif not key.endswith(Q8_SCALES):
            out[key] = t
    return out


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model: nn.Module, tokenizer, out_dir, extra_config: dict | None = None) -> Path:
    """Write a merged model (its linears ``QuantLinear``) to ``out_dir``; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qmods = quantized_modules(model)
    if not qmods:
        raise ModelError("this model has no quantized layers; merge the adapters before saving.")
    first = next(iter(qmods.values()))
    # Tied weights share storage; safetensors refuses aliases, so keep the first name only.
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape)
        if key in seen and t.numel():
            continue
        seen.add(key)
        tensors.update({k: v.contiguous() for k, v in eight_bit_parts(name, t.detach().cpu()).items()})
    save_file(tensors, out / WEIGHTS, metadata={"format": FORMAT})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": FORMAT, "format_version": FORMAT_VERSION, "bits": first.bits,
        "group_size": first.group_size, "modules": sorted(qmods), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_quant_config(model_dir) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} has no config.json; it is not a saved QA-LoRA model directory.")
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != FORMAT:
        raise ModelError(f"{model_dir} is not a QA-LoRA low-bit checkpoint (quant_method="
                         f"{qc.get('quant_method')!r}); point to the 'merged' folder a job wrote.")
    return qc


def load_quantized(model_dir, device: torch.device | str = "cpu", use_kernel: bool = True,
                   with_tokenizer: bool = True, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` saved by :func:`save_quantized`, in a fresh process, no adapter.

    ``dtype`` casts the non-quantized tensors (embeddings, norms) for inference, e.g. bf16 to
    pair with the int4 kernel; scales and offsets always stay fp32.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    qc = read_quant_config(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    state = float_state(load_file(model_dir / WEIGHTS, device=str(device)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    bits, group_size = qc["bits"], qc["group_size"]
    for name in qc["modules"]:
        old = model.get_submodule(name)
        qt = QuantizedTensor(state[f"{name}.packed"], state[f"{name}.scale"],
                             state[f"{name}.offset"], bits, group_size, old.in_features)
        bias = state.get(f"{name}.bias")
        set_module(model, name, QuantLinear(qt, bias, use_kernel=use_kernel))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelError(f"{model_dir}/{WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    materialize_buffers(model, config, device)
    if dtype is not None:
        set_compute_dtype(model, dtype)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if with_tokenizer else None
    return model.eval(), tokenizer
