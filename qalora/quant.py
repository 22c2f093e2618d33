"""Group-wise asymmetric quantization and bit-packing.

A weight ``W`` of shape ``(out, in)`` is split along ``in`` into groups of ``group_size``
consecutive inputs. Each (row, group) pair has a float ``scale`` and a float ``offset``::

    W[o, i] ~= scale[o, i // group_size] * q[o, i] + offset[o, i // group_size]

with integer codes ``q`` in ``[0, 2**bits - 1]``. The offset is a float (not an integer zero
point) because QA-LoRA's merge adds the adapter to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import VALID_BITS
from .errors import ConfigError


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group scale and offset for one ``(out, in)`` weight."""
    packed: torch.Tensor   # uint8 (out, in * bits // 8)
    scale: torch.Tensor    # float (out, in // group_size)
    offset: torch.Tensor   # float (out, in // group_size)
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def codes(self) -> torch.Tensor:
        """Integer codes, uint8 ``(out, in)``."""
        return unpack_codes(self.packed, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scale, self.offset, dtype)

    def to(self, device) -> QuantizedTensor:
        """The same weight on ``device`` (no copy where it already is)."""
        return QuantizedTensor(self.packed.to(device), self.scale.to(device), self.offset.to(device),
                               self.bits, self.group_size, self.in_features)


def valid_group_sizes(in_features: int, candidates=(16, 32, 64, 128, 256)) -> list[int]:
    return [g for g in candidates if in_features % g == 0]


def check_group_size(in_features: int, group_size: int, layer: str = "layer") -> None:
    """Raise a ConfigError naming the layer when ``group_size`` does not divide ``in_features``."""
    if in_features % group_size:
        valid = valid_group_sizes(in_features) or [d for d in range(2, in_features + 1) if in_features % d == 0][:8]
        raise ConfigError(
            f"group_size={group_size} does not divide in_features={in_features} of {layer}; "
            f"valid group sizes for this model include {valid}.")
    if in_features % 8:
        raise ConfigError(f"{layer} has in_features={in_features}, not a multiple of 8; "
                          "bit-packing needs whole bytes per row.")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, layer: str = "layer"):
    """Round-to-nearest min-max quantization.

    Args:
        weight: ``(out, in)`` float tensor.
    Returns:
        ``(codes, scale, offset)``: uint8 ``(out, in)``, float32 ``(out, in // group_size)`` twice.
    """
    if bits not in VALID_BITS:
        raise ConfigError(f"bits={bits} is not supported; choose one of {list(VALID_BITS)}.")
    out_f, in_f = weight.shape
    check_group_size(in_f, group_size, layer)
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    qmax = 2 ** bits - 1
    # A constant group would give scale 0; any positive scale then represents it exactly.
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, qmax).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(out, in)`` codes and ``(out, groups)`` scale/offset -> ``(out, in)`` weight in ``dtype``.

    Computed in fp32 and rounded to ``dtype`` once: a bf16 weight is the nearest bf16 to the exact
    ``scale * q + offset``, whichever path (eager, compiled, the merged model) computes it.
    """
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    # Integer codes go into addcmul as they are: it promotes them in the same pass, so no
    # full-size float copy of the codes is made.
    q = codes.reshape(out_f, groups, in_f // groups)
    if q.is_floating_point():
        q = q.float()
    w = torch.addcmul(offset.float()[..., None], q, scale.float()[..., None]).reshape(out_f, in_f)
    return w if dtype == torch.float32 else w.to(dtype)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                      in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed ``(out, in * bits // 8)`` codes -> ``(out, in)`` weight in ``dtype``: unpack and
    dequantize (one fused kernel inside a compiled decoder layer, see ``qalora.compiled``)."""
    return dequantize(unpack_codes(packed, bits, in_features), scale, offset, dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``(out, in)`` into uint8 ``(out, in * bits // 8)``.

    Every block of 8 consecutive codes becomes ``bits`` little-endian bytes, code ``k`` at bit
    ``bits * k``. For 2, 4 and 8 bits this is the same as packing each byte on its own.
    """
    out_f, in_f = codes.shape
    if in_f % 8:
        raise ConfigError(f"cannot pack {in_f} codes per row; in_features must be a multiple of 8.")
    if 8 % bits == 0:
        # Whole codes per byte: OR the shifted codes in uint8, no int64 copy of the weight.
        c = codes.to(torch.uint8).reshape(out_f, in_f * bits // 8, 8 // bits)
        out = c[..., 0].clone()
        for k in range(1, 8 // bits):
            out |= c[..., k] << (k * bits)
        return out
    c = codes.to(torch.int64).reshape(out_f, in_f // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # fits: 8 * bits <= 64
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(out_f, in_f // 8 * bits)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(out, in * bits // 8)`` -> uint8 ``(out, in)``."""
    out_f = packed.shape[0]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        # Fast path used in every training step: shifts on uint8, no int64 widening.
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(out_f, in_features)
    b = packed.to(torch.int64).reshape(out_f, in_features // 8, bits)
    word = (b << (torch.arange(bits, dtype=torch.int64, device=packed.device) * 8)).sum(-1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((word >> shifts) & mask).to(torch.uint8).reshape(out_f, in_features)


def quantize_tensor(weight: torch.Tensor, bits: int, group_size: int, layer: str = "layer") -> QuantizedTensor:
    codes, scale, offset = quantize_rtn(weight, bits, group_size, layer)
    return from_codes(codes, scale, offset, bits)


def from_codes(codes, scale, offset, bits: int) -> QuantizedTensor:
    out_f, in_f = codes.shape
    # A meta tensor has no values to check (the device-tracing tests run this on meta).
    if not codes.is_meta and int(codes.max()) >= 2 ** bits:
        raise ConfigError(f"codes exceed the {bits}-bit range")
    return QuantizedTensor(pack_codes(codes, bits), scale.float().contiguous(), offset.float().contiguous(),
                           bits, in_f // scale.shape[1], in_f)
