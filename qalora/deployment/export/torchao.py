"""Transformers checkpoints in torchao's layouts: stock ``from_pretrained`` loads them.

Two layouts, one exporter (:func:`export_torchao`):

- ``intx`` (format ``torchao``, any bits): for compatibility, on the CPU or a GPU (below);
- ``int4`` (format ``torchao-int4``, 4-bit runs): ``Int4WeightOnlyConfig`` in the tinygemm layout
  (``Int4TilePackedTo4dTensor``), the layout of PyTorch's CUDA int4 kernel, for speed on CUDA
  (compute capability 8.0+). The kernel computes ``w = (q - 8) * scale + zero`` with bf16 scale and
  zero per group; ours is ``w = scale * q + offset``, so ``zero = offset + 8 * scale`` keeps the
  merged offsets (rounded to bf16) and the codes as they are. The packed tiles are written here by
  :func:`tinygemm_pack` (the CUDA packer has no CPU version), which is checked bit for bit against
  ``torch.ops.aten._convert_weight_to_int4pack`` on a GPU (``tests/test_export_torchao.py``). Only a
  GPU runs it, so its fidelity is measured where one is present and reported as not measured
  elsewhere.

The ``intx`` layout:

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

from qalora.deployment.export.native import WEIGHTS, get_float, load_quantized, logical_keys, read_quant_config
from qalora.errors import ConfigError, ModelError
from qalora.method.quant import unpack_codes

LAYOUTS = ("intx", "int4")
INT4_K_MULTIPLE = 1024  # torchao pads a tinygemm weight's input width to this, and its activations alike
INT4_INNER_K_TILES = 8  # fixed by Int4TilePackedTo4dTensor

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_BYTES = 4 * 2 ** 30
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def torchao_config(bits: int, group_size: int, layout: str = "intx") -> dict:
    """The ``quantization_config`` transformers reads: torchao's own serialization of the config."""
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup
    from torchao.quantization.quantize_.workflows import IntxPackingFormat
    from transformers import TorchAoConfig

    if layout == "int4":
        config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    else:
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size),
                                      mapping_type=MappingType.ASYMMETRIC,
                                      intx_packing_format=IntxPackingFormat.UNPACKED_TO_INT8)
    return TorchAoConfig(config).to_dict()


def _tinygemm_index(n: int, k: int, inner: int):
    """For every int32 of the packed ``(n/8, k/(inner*16), 32, inner/2)`` tensor: the row and the
    four byte columns (of the ``(n, k/2)`` byte matrix) its nibbles come from, as PyTorch's CUDA
    packer (``matrix_to_m16n8k16_Bint4_layout``) lays out the B operand of an m16n8k16 MMA: lane
    ``t`` of a tile holds row ``t // 4`` and, of each two 16-wide k-tiles, bytes ``t % 4`` and
    ``t % 4 + 4`` of each."""
    n_tile = torch.arange(n // 8).view(-1, 1, 1, 1)
    k_outer = torch.arange(k // (inner * 16)).view(1, -1, 1, 1)
    lane = torch.arange(32).view(1, 1, -1, 1)
    pair = torch.arange(inner // 2).view(1, 1, 1, -1)
    row = n_tile * 8 + lane // 4
    base = (k_outer * inner + 2 * pair) * 8
    first = base + lane % 4
    return row, (first, first + 4, first + 8, first + 12)


def tinygemm_pack(codes: torch.Tensor, inner: int = INT4_INNER_K_TILES) -> torch.Tensor:
    """``(n, k)`` 4-bit codes -> the int32 ``(n/8, k/(inner*16), 32, inner/2)`` tiles of
    ``torch.ops.aten._convert_weight_to_int4pack`` (NVIDIA), computed on any device.

    ``n`` must be a multiple of 8 and ``k`` of ``inner * 16``. Each int32 holds 8 codes: the high
    nibbles (even ``k``) of its four bytes in bits 0-15, the low nibbles (odd ``k``) in bits 16-31.
    """
    n, k = codes.shape
    byte = (codes[:, ::2].long() << 4) | codes[:, 1::2].long()  # (n, k/2): even k in the high nibble
    row, cols = _tinygemm_index(n, k, inner)
    v = [byte[row, c] for c in cols]
    word = sum((v[i] >> 4) << (4 * i) for i in range(4)) + sum((v[i] & 0xF) << (16 + 4 * i) for i in range(4))
    return (word - ((word >> 31) << 32)).to(torch.int32)  # as a signed 32-bit word


def tinygemm_unpack(packed: torch.Tensor, n: int, k: int, inner: int = INT4_INNER_K_TILES) -> torch.Tensor:
    """Inverse of :func:`tinygemm_pack`: ``(n, k)`` uint8 codes."""
    word = packed.long() & 0xFFFFFFFF
    byte = torch.zeros(n, k // 2, dtype=torch.long)
    row, cols = _tinygemm_index(n, k, inner)
    for i, c in enumerate(cols):
        r, c = torch.broadcast_tensors(row, c)
        byte[r, c] = (((word >> (4 * i)) & 0xF) << 4) | ((word >> (16 + 4 * i)) & 0xF)
    codes = torch.stack([byte >> 4, byte & 0xF], dim=-1).reshape(n, k)
    return codes.to(torch.uint8)


def int4_weight(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int):
    """Our packed 4-bit ``(out, in/2)`` codes, ``(out, groups)`` scale and offset -> torchao's
    ``Int4TilePackedTo4dTensor`` (bf16). ``in`` is padded to a multiple of 1024 and ``out`` to one
    of 8, as torchao pads; padded weights have scale and zero 0."""
    import torch.nn.functional as F
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
        Int4TilePackedTo4dTensor)

    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    k_pad = -(-in_f // INT4_K_MULTIPLE) * INT4_K_MULTIPLE
    n_pad = -(-out_f // 8) * 8
    codes = F.pad(unpack_codes(packed, 4, in_f), (0, k_pad - in_f, 0, n_pad - out_f))
    pad = (0, k_pad // group_size - scale.shape[1], 0, n_pad - out_f)
    s = F.pad(scale.float(), pad)
    zero = F.pad(offset.float() + 8 * scale.float(), pad)
    scale_and_zero = torch.stack([s.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (groups, n, 2)
    return Int4TilePackedTo4dTensor(tinygemm_pack(codes), scale_and_zero, [1, group_size], torch.Size([out_f, in_f]))


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


def check_layout(layout: str, bits: int, group_size: int, dtype: str = "bfloat16") -> None:
    """Refuse a layout that cannot hold this model, naming what would."""
    from qalora.deployment.export.formats import int4_layout_fits, int4_refusal

    if layout not in LAYOUTS:
        raise ConfigError(f"torchao layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}.")
    if layout == "int4" and not int4_layout_fits(bits, group_size, dtype):
        raise ConfigError(int4_refusal(bits, group_size))


def _converted_state(model_dir: Path, modules: list[str], bits: int, group_size: int, layout: str,
                     torch_dtype: torch.dtype, progress) -> dict:
    """The merged checkpoint's tensors in torchao's form: each quantized layer's ``weight`` as a
    torchao tensor (:func:`int4_weight` or :func:`intx_weight`), the rest in ``torch_dtype``."""
    from safetensors import safe_open

    state: dict = {}
    with safe_open(model_dir / WEIGHTS, "pt") as f:
        keys = logical_keys(f.keys())
        quantized = set(modules)
        plain = [k for k in keys if k.rsplit(".", 1)[0] not in quantized or k.endswith(".bias")]
        total = len(modules) + len(plain)
        for i, name in enumerate(modules, 1):
            parts = [f.get_tensor(f"{name}.{part}") for part in ("packed", "scale", "offset")]
            state[f"{name}.weight"] = (int4_weight(*parts, group_size) if layout == "int4"
                                       else intx_weight(*parts, bits, group_size, torch_dtype))
            progress(i, total)
        for i, key in enumerate(plain, len(modules) + 1):
            t = get_float(f, key)
            state[key] = t.to(torch_dtype) if t.is_floating_point() else t
            progress(i, total)
    return state


def _write_shards(state: dict, out: Path, shard_bytes: int) -> None:
    """``state`` as safetensors shards of at most ``shard_bytes`` (one file when it fits), with
    transformers' index when there are several."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

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


def export_torchao(model_dir, out_dir, dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES,
                   on_progress=None, layout: str = "intx") -> Path:
    """Write the merged checkpoint in ``model_dir`` as a torchao transformers folder at ``out_dir``.

    ``dtype`` is the checkpoint's dtype (embeddings, norms, scales, zero points; the ``int4``
    layout is bf16 only); ``layout`` ``intx`` or ``int4`` (4-bit runs); ``on_progress`` counts
    tensors converted, then shards written.
    """
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    model_dir, out = Path(model_dir), Path(out_dir)
    qc = read_quant_config(model_dir)
    bits, group_size, modules = int(qc["bits"]), int(qc["group_size"]), list(qc["modules"])
    check_layout(layout, bits, group_size, dtype)
    progress = on_progress or (lambda done, total: None)
    state = _converted_state(model_dir, modules, bits, group_size, layout, DTYPES[dtype], progress)
    _write_shards(state, out, shard_bytes)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    config["quantization_config"] = torchao_config(bits, group_size, layout)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in model_dir.iterdir():  # tokenizer, chat template, generation config
        if extra.is_file() and extra.name not in (WEIGHTS, "config.json"):
            shutil.copy2(extra, out / extra.name)
    return out


CHECK_TEXT = ("A quantized model is only useful where people run it: this text checks that the exported "
              "checkpoint computes what the merged model computes, token by token.")


@torch.no_grad()
def fidelity(merged_dir, export_dir, text: str = CHECK_TEXT, device: str = "cpu") -> dict:
    """Logits of the export (stock transformers) against the merged model (fp32 reference) on ``text``.

    Returns ``max_abs_logit_diff``, ``max_abs_logit`` (for scale), ``top1_agreement`` (positions
    whose most likely next token is the same) and ``check_tokens``. Both models run on ``device``
    (the int4 layout only on CUDA).
    """
    from transformers import AutoModelForCausalLM

    ours, tok = load_quantized(merged_dir, use_kernel=False, device=device)
    theirs = AutoModelForCausalLM.from_pretrained(export_dir, device_map=device)
    ids = torch.tensor([tok(text)["input_ids"]], device=device)
    exact = ours(input_ids=ids).logits.float()[0]
    got = theirs(input_ids=ids).logits.float()[0]
    return {"max_abs_logit_diff": (got - exact).abs().max().item(), "max_abs_logit": exact.abs().max().item(),
            "top1_agreement": (got.argmax(-1) == exact.argmax(-1)).float().mean().item(),
            "check_tokens": ids.shape[1], "device": device}


def int4_fidelity(merged_dir, export_dir) -> dict:
    """:func:`fidelity` of an int4 (tinygemm) export on the first GPU that runs the kernel, or why
    it was not measured."""
    from qalora.method.kernels import cuda_capability

    if not torch.cuda.is_available() or cuda_capability(torch.device("cuda")) < (8, 0):
        return {"fidelity": "not measured: the tinygemm kernel runs on CUDA GPUs of compute capability 8.0+ only, "
                            "and none is here"}
    return fidelity(merged_dir, export_dir, device="cuda")
