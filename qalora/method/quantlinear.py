"""The merged low-bit layer ``QuantLinear``: packed codes, float scales and offsets, no adapter."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qalora.method import kernels
from qalora.method.layer import LowRankOnQuantized, compute_dtype
from qalora.method.quant import QuantizedTensor, dequantize_packed, unpack_codes


class QuantLinear(nn.Module):
    """A merged low-bit linear: packed codes, float scale and float offset, no adapter.

    ``forward`` uses PyTorch's int4 kernel where the device, bits and group size allow it
    (``use_kernel``) and the call has few rows (decode; see ``kernels.KERNEL_MAX_ROWS``), else
    dequantizes and runs a dense matmul (the reference).
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, use_kernel: bool = True):
        super().__init__()
        self.in_features, self.out_features = qt.in_features, qt.out_features
        self.bits, self.group_size = qt.bits, qt.group_size
        self.register_buffer("packed", qt.packed)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("offset", qt.offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.use_kernel = use_kernel
        self._kernel_cache: tuple | None = None  # (device, (packed int4 weight, scales_and_zeros) or None)
        self.keep_dense = False  # keep the dequantized weight between calls (see keep_dequantized)
        self._dense: torch.Tensor | None = None

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed, self.scale, self.offset, self.bits, self.group_size, self.in_features)

    def kernel_active(self, device: torch.device) -> bool:
        return self.use_kernel and kernels.int4_kernel_supported(
            device, self.bits, self.group_size, self.in_features, self.out_features)

    def prepare_kernel(self, pad_to: tuple[int, int] | None = None) -> bool:
        """Convert the weight to the int4 kernel's layout now (else the first kernel call does):
        before a decode step is compiled, so the graph only reads it. ``pad_to``: see
        :func:`qalora.method.kernels.kernel_layout`. Returns whether the kernel can run here."""
        device = self.packed.device
        prepared = None
        if kernels.int4_kernel_supported(device, self.bits, self.group_size, self.in_features, self.out_features):
            codes = unpack_codes(self.packed, self.bits, self.in_features)
            layout = kernels.kernel_layout(device.type, self.group_size, self.in_features, self.out_features, pad_to)
            prepared = kernels.prepare_int4(codes, self.scale, self.offset, self.group_size, self.bits, layout)
        self._kernel_cache = (device, prepared)
        return prepared is not None

    def _kernel_weights(self, device: torch.device):
        """``(packed weight, scales and zeros)`` on ``device``, or None where the kernel cannot run."""
        if self._kernel_cache is None or self._kernel_cache[0] != device:
            self.prepare_kernel()
        return self._kernel_cache[1]

    def kernel_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight the kernel computes with (bf16-rounded scale and zero)."""
        codes, zeros = kernels.kernel_codes_and_zeros(unpack_codes(self.packed, self.bits, self.in_features),
                                                      self.scale, self.offset, self.bits)
        bf = lambda t: t.to(torch.bfloat16).float()[..., None]  # noqa: E731
        q = codes.float().unflatten(1, (-1, self.group_size))
        return ((q - 8) * bf(self.scale) + bf(zeros)).flatten(1)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        w = self._dense
        if w is None or w.dtype != dtype or w.device != self.packed.device:
            w = dequantize_packed(self.packed, self.scale, self.offset, self.bits, self.in_features, dtype)
            self._dense = w if self.keep_dense else None
        return F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        prepared = None
        if self.use_kernel and rows <= kernels.kernel_max_rows(x.device):
            prepared = self._kernel_weights(x.device)
        if prepared is None:
            return self.reference_forward(x)
        y = kernels.int4_matmul(x, *prepared, self.group_size, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def keep_dequantized(model: nn.Module, keep: bool = True) -> nn.Module:
    """Dequantize each packed weight once and keep it, for many large batches (benchmarks on a CPU):
    the same values the reference path computes per call, at the float model's memory."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.keep_dense, m._dense = keep, None
    return model


def dequantize_once_if_it_fits(model: nn.Module) -> bool:
    """On a CPU, keep each layer's dequantized weight for a whole evaluation and use it for every
    call (dense matmuls beat the int4 kernel on the tens of rows an evaluation sends, and nothing
    is dequantized twice), where the float weights take at most a quarter of the free memory. The
    weights are the exact merged ones the reference path computes. Returns whether it did."""
    import psutil

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers or layers[0].packed.device.type != "cpu":
        return False
    if sum(m.in_features * m.out_features * 4 for m in layers) > psutil.virtual_memory().available / 4:
        return False
    keep_dequantized(model)
    for m in layers:
        m.use_kernel = False
    return True


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every float tensor except the quantized layers' (their scales and offsets stay fp32)."""
    skip = {id(t) for m in model.modules() if isinstance(m, (QuantLinear, LowRankOnQuantized))
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    with torch.no_grad():
        for m in model.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None and t.is_floating_point() and id(t) not in skip and t.dtype != dtype:
                        if isinstance(t, nn.Parameter):
                            store[name] = nn.Parameter(t.to(dtype), requires_grad=t.requires_grad)
                        else:
                            store[name] = t.to(dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model
