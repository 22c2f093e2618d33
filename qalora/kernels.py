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
    if bits > 4 or group_size not in KERNEL_GROUP_SIZES:
        return False
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and in_features % 2 == 0
    if device.type == "cuda":
        # _weight_int4pack_mm is built for compute capability 8.0+ (Ampere) only; older GPUs
        # take the dequantize fallback. Its layout tiles k by innerKTiles * 16 and n by 8.
        return (cuda_capability(device) >= (8, 0) and in_features % 128 == 0
                and out_features % 8 == 0)
    return False


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


def prepare_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, bits: int):
    """Convert our ``(out, in)`` codes and ``(out, groups)`` scale/offset to the kernel's layout.

    Returns ``(weight_int4pack, scales_and_zeros)``; the latter is bf16 ``(groups, out, 2)``.
    """
    codes, zeros = kernel_codes_and_zeros(codes, scale, offset, bits)
    sz = torch.stack([scale.float().t(), zeros.t()], dim=-1).contiguous().to(torch.bfloat16)
    if codes.device.type == "cpu":
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    else:
        w = torch.ops.aten._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8), 8)
    return w, sz


def int4_matmul(x: torch.Tensor, weight_int4pack, scales_and_zeros, group_size: int, out_features: int):
    """``(..., in)`` activations -> ``(..., out)``, computed in bf16, returned in ``x.dtype``."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight_int4pack, group_size, scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm(x2, weight_int4pack, group_size, scales_and_zeros)
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)
