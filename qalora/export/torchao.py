"""A transformers checkpoint in torchao's int-x layout: stock ``from_pretrained`` loads it.

torchao's ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig`` with the ``UNPACKED_TO_INT8``
packing format) keeps, for each linear, int8 codes centred on zero, and one scale and one
*float* zero point per row and group: ``w = (qdata - zero_point) * scale``. Ours is
``w = scale * q + offset``; with ``qdata = q - 2**(bits-1)`` and
``zero_point = -offset / scale - 2**(bits-1)`` the two are the same weight, so the merged offsets
survive and nothing is re-quantized. Scales and zero points are stored in the checkpoint's dtype
(bf16 by default, what transformers runs in): that rounding is the only change, measured in
``tests/test_export_torchao.py``. Codes take one byte each (torchao's int-x layout is unpacked),
and torchao dequantizes each weight at every forward: this format is for compatibility (stock
transformers on CPU or GPU), not for speed, where GGUF and the native format serve better.

Loading needs ``torchao`` installed beside transformers (the card says so).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import ModelError
from ..quant import unpack_codes
from .native import WEIGHTS, read_quant_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_BYTES = 4 * 2 ** 30
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def torchao_config(bits: int, group_size: int) -> dict:
    """The ``quantization_config`` transformers reads: torchao's own serialization of the config."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup
    from torchao.quantization.quantize_.workflows import IntxPackingFormat
    from transformers import TorchAoConfig

    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size),
                                  mapping_type=MappingType.ASYMMETRIC,
                                  intx_packing_format=IntxPackingFormat.UNPACKED_TO_INT8)
    return TorchAoConfig(config).to_dict()


def intx_weight(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                dtype: torch.dtype):
    """Our packed ``(out, in*bits/8)`` codes, ``(out, groups)`` scale and offset -> torchao's tensor."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor)

    mid = 2 ** (bits - 1)
    in_features = packed.shape[1] * 8 // bits
    qdata = (unpack_codes(packed, bits, in_features).to(torch.int16) - mid).to(torch.int8)
    zero_point = -offset.float() / scale.float() - mid
    return IntxUnpackedToInt8Tensor(qdata, scale.to(dtype), zero_point.to(dtype), getattr(torch, f"int{bits}"),
                                    (1, group_size), dtype, None)


def _shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive runs of ``names`` of at most ``limit`` bytes each (a tensor never splits)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def export_torchao(model_dir, out_dir, dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES,
                   on_progress=None) -> Path:
    """Write the merged checkpoint in ``model_dir`` as a torchao transformers folder at ``out_dir``.

    ``dtype`` is the checkpoint's dtype (embeddings, norms, scales, zero points); ``on_progress``
    counts tensors converted, then shards written.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype]
    model_dir, out = Path(model_dir), Path(out_dir)
    qc = read_quant_config(model_dir)
    bits, group_size, modules = int(qc["bits"]), int(qc["group_size"]), list(qc["modules"])
    progress = on_progress or (lambda done, total: None)
    state: dict = {}
    with safe_open(model_dir / WEIGHTS, "pt") as f:
        keys = list(f.keys())
        quantized = set(modules)
        plain = [k for k in keys if k.rsplit(".", 1)[0] not in quantized or k.endswith(".bias")]
        total = len(modules) + len(plain)
        for i, name in enumerate(modules, 1):
            state[f"{name}.weight"] = intx_weight(f.get_tensor(f"{name}.packed"), f.get_tensor(f"{name}.scale"),
                                                  f.get_tensor(f"{name}.offset"), bits, group_size, torch_dtype)
            progress(i, total)
        for i, key in enumerate(plain, len(modules) + 1):
            t = f.get_tensor(key)
            state[key] = t.to(torch_dtype) if t.is_floating_point() else t
            progress(i, total)
    data, metadata = flatten_tensor_state_dict(state)
    metadata["format"] = "pt"
    # A tensor subclass is stored as several entries ("<fqn>._weight_qdata", ...): keep them together.
    owner = {k: next(n for n in (k.split("._weight_")[0] + ".weight", k) if n in state) for k in data}
    sizes = {n: 0 for n in state}
    for k, t in data.items():
        sizes[owner[k]] += t.numel() * t.element_size()
    shards = _shards(list(state), sizes, shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    files = [SINGLE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(1, len(shards) + 1)]
    weight_map = {}
    for file, names in zip(files, shards):
        part = {k: t.contiguous() for k, t in data.items() if owner[k] in set(names)}
        # every shard carries the whole metadata: torchao rebuilds each tensor from its own shard's
        save_file(part, out / file, metadata=metadata)
        weight_map.update(dict.fromkeys(part, file))
    if len(files) > 1:
        total_size = sum(t.numel() * t.element_size() for t in data.values())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                                            indent=2))
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    config["quantization_config"] = torchao_config(bits, group_size)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in model_dir.iterdir():  # tokenizer, chat template, generation config
        if extra.is_file() and extra.name not in (WEIGHTS, "config.json"):
            shutil.copy2(extra, out / extra.name)
    return out


CHECK_TEXT = ("A quantized model is only useful where people run it: this text checks that the exported "
              "checkpoint computes what the merged model computes, token by token.")


@torch.no_grad()
def fidelity(merged_dir, export_dir, text: str = CHECK_TEXT) -> dict:
    """Logits of the export (stock transformers) against the merged model (fp32 reference) on ``text``.

    Returns ``max_abs_logit_diff``, ``max_abs_logit`` (for scale), ``top1_agreement`` (positions
    whose most likely next token is the same) and ``check_tokens``. Runs on the CPU.
    """
    from transformers import AutoModelForCausalLM

    from .native import load_quantized

    ours, tok = load_quantized(merged_dir, use_kernel=False)
    theirs = AutoModelForCausalLM.from_pretrained(export_dir)
    ids = torch.tensor([tok(text)["input_ids"]])
    exact = ours(input_ids=ids).logits.float()[0]
    got = theirs(input_ids=ids).logits.float()[0]
    return {"max_abs_logit_diff": (got - exact).abs().max().item(), "max_abs_logit": exact.abs().max().item(),
            "top1_agreement": (got.argmax(-1) == exact.argmax(-1)).float().mean().item(),
            "check_tokens": ids.shape[1]}
