"""Low-bit matmul kernels, chosen per device; each has a dequantize-and-matmul reference.

PyTorch ships an int4 weight-only matmul (``_weight_int4pack_mm_for_cpu`` on CPU with bf16
activations, ``_weight_int4pack_mm`` on CUDA) computing ``w = (q - 8) * scale + zero`` per
group with float ``zero``. Our ``w = scale * q + offset`` maps onto it exactly with
``zero = offset + 8 * scale``. 2- and 3-bit codes run through the same kernel, shifted up to
sit around 8 (``q + 8 - 2**(bits-1)``) so that ``zero`` stays near the group's mid-point, where
its bf16 rounding costs least.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# The int4 kernels are built for few rows (decode: one token per sequence); for many rows
# (prefill, evaluation) dequantize-then-matmul is faster. One layer, 4-bit (bench/gpu_check.py's
# "one layer" row and docs/gpu-check.md): on an H200 the kernel took 37-48 us against 164-389 us
# at 1 row and 599-1591 us against 175-425 us at 512 rows (LLaMA-7B shapes), a crossover near 110
# rows if the kernel's time grows linearly; on a 2-core x86 CPU the crossover was near 256 rows.
# Above these row counts a layer takes the dequantize path.
KERNEL_MAX_ROWS = {"cpu": 128, "cuda": 64}


def int4_kernel_supported(device: torch.device, bits: int, group_size: int, in_features: int,
                          out_features: int) -> bool:
    """Whether a layer of these sizes runs on the int4 kernel on ``device``. Widths need not fit the
    kernel's tiles: :func:`kernel_layout` pads them (exactly: padded weights and inputs are 0)."""
    if bits > 4 or group_size not in KERNEL_GROUP_SIZES:
        return False
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and in_features % 2 == 0
    if device.type == "cuda":
        # _weight_int4pack_mm is built for compute capability 8.0+ (Ampere) only; older GPUs
        # take the dequantize fallback.
        return cuda_capability(device) >= (8, 0)
    return False


def kernel_layout(device_type: str, group_size: int, in_features: int, out_features: int,
                  pad_to: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """``(padded in, padded out, inner k-tiles)`` of a layer on the kernel of ``device_type``.

    CUDA's kernel tiles ``in`` by ``16 x inner`` (inner 2, 4 or 8: the largest that fits is fastest)
    and ``out`` by 8, and needs whole quantization groups: ``in`` is padded to a multiple of
    ``max(group, 32)``, ``out`` to a multiple of 8 (SmolLM2's 576-wide layers: inner 4, no
    padding; a 196-wide output: 4 padded rows). The CPU kernel needs ``out`` a multiple of 16.
    ``pad_to`` forces ``(in multiple, out multiple)`` (the tests pad more on the CPU to check that
    padding is exact).
    """
    k_mult, n_mult = pad_to or ((max(group_size, 32), 8) if device_type == "cuda" else (group_size, 16))
    k_pad, n_pad = -(-in_features // k_mult) * k_mult, -(-out_features // n_mult) * n_mult
    inner = next((t for t in (8, 4, 2) if k_pad % (16 * t) == 0), 2) if device_type == "cuda" else 1
    return k_pad, n_pad, inner


def kernel_max_rows(device: torch.device) -> int:
    """Most activation rows (tokens) a call sends through the int4 kernel on ``device``."""
    return KERNEL_MAX_ROWS.get(device.type, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, asked once per GPU (layers ask on every call)."""
    if not torch.cuda.is_available():
        return (0, 0)
    return _capability(device.index)  # None: the current GPU


def kernel_codes_and_zeros(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int):
    """Codes and zeros in the kernel's convention ``w = (q' - 8) * scale + zero`` (exact in fp32)."""
    shift = 8 - 2 ** (bits - 1)
    return codes.to(torch.int32) + shift, offset.float() + (8 - shift) * scale.float()


def prepare_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, bits: int,
                 layout: tuple[int, int, int] | None = None):
    """Convert our ``(out, in)`` codes and ``(out, groups)`` scale/offset to the kernel's layout.

    ``layout`` is :func:`kernel_layout`'s (default: the device's own). Padded rows and columns
    get scale and zero 0, so their weights are exactly 0. Returns ``(weight_int4pack,
    scales_and_zeros)``; the latter is bf16 ``(padded in / group, padded out, 2)``.
    """
    out_f, in_f = codes.shape
    k_pad, n_pad, inner = layout or kernel_layout(codes.device.type, group_size, in_f, out_f)
    codes, zeros = kernel_codes_and_zeros(codes, scale, offset, bits)
    if (k_pad, n_pad) != (in_f, out_f):
        codes = F.pad(codes, (0, k_pad - in_f, 0, n_pad - out_f), value=8)
        pad = (0, k_pad // group_size - scale.shape[1], 0, n_pad - out_f)
        scale, zeros = F.pad(scale.float(), pad), F.pad(zeros, pad)
    sz = torch.stack([scale.float().t(), zeros.t()], dim=-1).contiguous().to(torch.bfloat16)
    if codes.device.type == "cpu":
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    else:
        w = torch.ops.aten._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8), inner)
    return w, sz


def int4_matmul(x: torch.Tensor, weight_int4pack, scales_and_zeros, group_size: int, out_features: int):
    """``(..., in)`` activations -> ``(..., out)``, computed in bf16, returned in ``x.dtype``.

    Inputs are padded with zeros to the packed weight's width and the padded outputs dropped.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    k_pad = scales_and_zeros.shape[0] * group_size
    if k_pad > x2.shape[-1]:
        x2 = F.pad(x2, (0, k_pad - x2.shape[-1]))
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight_int4pack, group_size, scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm(x2, weight_int4pack, group_size, scales_and_zeros)
    return y[:, :out_features].reshape(*x.shape[:-1], out_features).to(x.dtype)
