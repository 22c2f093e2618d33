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

# The group-size rule lives with QuantConfig (torch-free, so the form can ask it too).
from qalora.config import VALID_BITS, check_group_size
from qalora.errors import ConfigError


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


# Clip ratios the search tries per group (1.0 is plain min-max, so the search never does worse).
CLIP_RATIOS = tuple(round(1.0 - 0.05 * k, 2) for k in range(11))  # 1.00, 0.95, ..., 0.50


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, layer: str = "layer", clip: bool = False,
                 importance: torch.Tensor | None = None):
    """Round-to-nearest quantization: min-max, or with ``clip`` the best of a clip search.

    The clip search (per group) shrinks the group's range around its mid-point by each ratio of
    :data:`CLIP_RATIOS`, rounds, refits scale and offset to those codes by least squares, and keeps
    the ratio whose weights are closest to the original (each input weighted by ``importance``,
    ``(in,)``, e.g. the mean squared input of the layer: the layer output's error). Ratio 1.0 with
    no refit is plain min-max and is always a candidate, so the error never exceeds min-max's.

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
    codes, scale = _round(w, lo, hi, qmax)
    if clip and not w.is_meta:
        imp = (torch.ones(in_f, device=w.device) if importance is None else
               importance.to(device=w.device, dtype=torch.float32)).reshape(1, in_f // group_size, group_size)
        best = _group_error(w, codes, scale, lo, imp)
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        for ratio in CLIP_RATIOS:
            c, s = _round(w, mid - half * ratio, mid + half * ratio, qmax)
            s, o = _refit(w, c, s, mid - half * ratio, imp)
            err = _group_error(w, c, s, o, imp)
            better = err < best
            best = torch.where(better, err, best)
            codes = torch.where(better[..., None], c, codes)
            scale, lo = torch.where(better, s, scale), torch.where(better, o, lo)
    return codes.reshape(out_f, in_f), scale, lo


def _round(w, lo, hi, qmax):
    # A constant group would give scale 0; any positive scale then represents it exactly.
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, qmax).to(torch.uint8)
    return codes, scale


def _refit(w, codes, scale, offset, imp):
    """Least-squares scale and offset for fixed codes, per group (weighted by ``imp``); a group whose
    fit is degenerate (one code value, or a scale that is not positive) keeps ``scale``/``offset``."""
    q = codes.float()
    sw, sq, sqq = imp.sum(-1), (imp * q).sum(-1), (imp * q * q).sum(-1)
    sx, sqx = (imp * w).sum(-1), (imp * q * w).sum(-1)
    det = sw * sqq - sq * sq
    s = (sw * sqx - sq * sx) / det.clamp_min(1e-12)
    o = (sx - s * sq) / sw
    ok = (det > 1e-6 * sw * sw) & (s > 1e-8)
    return torch.where(ok, s, scale), torch.where(ok, o, offset)


def _group_error(w, codes, scale, offset, imp):
    return (imp * (codes.float() * scale[..., None] + offset[..., None] - w).square()).sum(-1)


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


def quantize_tensor(weight: torch.Tensor, bits: int, group_size: int, layer: str = "layer", clip: bool = False,
                    importance: torch.Tensor | None = None) -> QuantizedTensor:
    codes, scale, offset = quantize_rtn(weight, bits, group_size, layer, clip, importance)
    return from_codes(codes, scale, offset, bits)


def from_codes(codes, scale, offset, bits: int) -> QuantizedTensor:
    out_f, in_f = codes.shape
    # A meta tensor has no values to check (the device-tracing tests run this on meta).
    if not codes.is_meta and int(codes.max()) >= 2 ** bits:
        raise ConfigError(f"codes exceed the {bits}-bit range")
    return QuantizedTensor(pack_codes(codes, bits), scale.float().contiguous(), offset.float().contiguous(),
                           bits, in_f // scale.shape[1], in_f)


# 8-bit storage of what QA-LoRA does not train (token embedding, output head): ggml's Q8_0, blocks of
# 32 consecutive values along a row sharing one fp16 scale, ``w = d * q`` with int8 ``q``.
Q8_BLOCK = 32


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` float -> int8 codes ``(rows, cols)`` and fp16 scales ``(rows, cols // 32)``.

    Lossless for values that came from Q8_0 (a GGUF base's embedding): their block maximum is
    ``127 * d``, so ``d`` and the codes come back unchanged.
    """
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // Q8_BLOCK, Q8_BLOCK)
    d = (w.abs().amax(-1) / 127).half()
    safe = torch.where(d == 0, torch.ones_like(d), d).float()
    codes = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(rows, cols), d


def dequantize_q8_0(codes: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = codes.shape
    w = (codes.float().reshape(rows, cols // Q8_BLOCK, Q8_BLOCK) * d.float()[..., None]).reshape(rows, cols)
    return w if dtype == torch.float32 else w.to(dtype)


def q8_0_fits(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % Q8_BLOCK == 0 and weight.is_floating_point()


def round_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """The values Q8_0 stores for ``weight`` (fp32 arithmetic, returned in ``weight``'s dtype)."""
    return dequantize_q8_0(*quantize_q8_0(weight), dtype=weight.dtype)
