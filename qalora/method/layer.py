"""The QA-LoRA linear layer: a frozen packed low-bit base plus a group-pooled low-rank adapter."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qalora.method.quant import QuantizedTensor, dequantize_packed, unpack_codes


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else the input's."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _PackedLinearFn(torch.autograd.Function):
    """``y = x @ dequant(packed).T + bias`` that saves only the packed weight for backward.

    The dequantized weight exists only inside ``forward`` and again inside ``backward``, so
    activation memory never holds a full-precision copy of the base.
    """

    @staticmethod
    def forward(ctx, x, packed, scale, offset, bias, bits: int, in_features: int):
        w = dequantize_packed(packed, scale, offset, bits, in_features, x.dtype)
        ctx.save_for_backward(packed, scale, offset)
        ctx.meta = (bits, in_features)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, scale, offset = ctx.saved_tensors
        bits, in_features = ctx.meta
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        w = dequantize_packed(packed, scale, offset, bits, in_features, grad_out.dtype)
        return grad_out @ w, None, None, None, None, None, None


class _QALoRAFn(torch.autograd.Function):
    """A whole QA-LoRA layer as one function: the adapter folded into the dequantized weight.

    The adapter adds ``D = s * B @ A`` (``(out, groups)``) times the group sums of ``x``, which is
    the same as adding ``D[o, g]`` to every weight of group ``g``: the merge, done on the fly. So
    without dropout the forward is one dequantize (with ``offset + D``) and one matmul, and the
    backward one dequantize, the input's matmul and ``dD = g^T @ pool(x)`` (``(out, groups)``,
    1/group_size of a dense weight gradient); ``A`` and ``B`` get their gradients from ``dD``.
    With dropout the adapter sees ``drop(pool(x))`` while the base sees ``x``, so the adapter term
    ``drop(pool(x)) @ D^T`` is one extra ``(tokens, groups) x (groups, out)`` matmul.

    What backward recomputes rather than keeps (the policy): the dequantized weight, one fused
    kernel reading the packed codes, against keeping a 16-bit copy of every layer for the whole
    step (2 bytes a parameter: as much memory as the base the packing saved). It keeps the group
    sums ``pool(x)`` (fp32, ``in / group_size`` values a token) and the dropout mask; ``D`` is
    recomputed (``out x rank x groups`` multiply-adds).

    Learned scales (``scale`` a trainable parameter): ``w = scale * q + offset + D`` gives
    ``dscale[o, g] = sum_{i in g} q[o, i] * dW[o, i]`` with ``dW = g^T @ x``: one more matmul per
    layer, formed in backward and reduced to ``(out, groups)`` at once (no float weight is kept).
    It needs the layer's input, so forward keeps ``x`` too (in the compute dtype).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, packed, scale, offset, bias, mask, scaling: float, bits: int,
                group_size: int):
        in_features = x.shape[-1]
        delta = scaling * (lora_B.float() @ lora_A.float())  # (out, groups)
        pooled = x.unflatten(-1, (-1, group_size)).sum(-1, dtype=torch.float32)  # (..., groups)
        if mask is None:
            w = dequantize_packed(packed, scale, offset + delta, bits, in_features, x.dtype)
            y = F.linear(x, w, bias)
        else:
            pooled = pooled * mask
            w = dequantize_packed(packed, scale, offset, bits, in_features, x.dtype)
            y = F.linear(x, w, bias) + F.linear(pooled.to(x.dtype), delta.to(x.dtype))
        ctx.save_for_backward(packed, scale, offset, lora_A, lora_B, pooled, mask,
                              x if ctx.needs_input_grad[4] else None)
        ctx.meta = (scaling, bits, group_size, in_features)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        packed, scale, offset, lora_A, lora_B, pooled, mask, x = ctx.saved_tensors
        scaling, bits, group_size, in_features = ctx.meta
        dtype = grad_out.dtype
        A, B = lora_A.float(), lora_B.float()
        delta = scaling * (B @ A)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        d_delta = (g2.t() @ pooled.reshape(-1, pooled.shape[-1]).to(dtype)).float()  # (out, groups)
        grad_A = (scaling * (B.t() @ d_delta)).to(lora_A.dtype)
        grad_B = (scaling * (d_delta @ A.t())).to(lora_B.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x = grad_out @ dequantize_packed(packed, scale, offset + delta, bits, in_features, dtype)
            else:
                grad_x = grad_out @ dequantize_packed(packed, scale, offset, bits, in_features, dtype)
                grad_pool = (grad_out @ delta.to(dtype)) * mask  # (..., groups)
                grad_x = (grad_x.unflatten(-1, (-1, group_size)) + grad_pool.unsqueeze(-1).to(dtype)).flatten(-2)
        grad_scale = None
        if x is not None:
            d_w = g2.t() @ x.reshape(-1, in_features).to(dtype)  # (out, in), this layer's only
            codes = unpack_codes(packed, bits, in_features)
            grad_scale = (d_w.unflatten(-1, (-1, group_size)).mul_(codes.unflatten(-1, (-1, group_size)))
                          .sum(-1, dtype=torch.float32)).to(scale.dtype)
        return grad_x, grad_A, grad_B, None, grad_scale, None, None, None, None, None, None


class LowRankOnQuantized(nn.Module):
    """What both adapter layers share: a frozen packed low-bit base plus ``s * B(A(dropout(pool(x))))``.

    The two siblings differ only in what ``lora_A`` sees (``pool``) and hence its width.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, rank: int, alpha: float,
                 dropout: float, adapter_dtype: torch.dtype, a_width: int):
        super().__init__()
        self.in_features, self.out_features = qt.in_features, qt.out_features
        self.bits, self.group_size, self.rank = qt.bits, qt.group_size, rank
        self.scaling = alpha / rank
        self.register_buffer("packed", qt.packed)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("offset", qt.offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        device = qt.packed.device
        self.lora_A = nn.Parameter(torch.empty(rank, a_width, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=adapter_dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed, self.scale, self.offset, self.bits, self.group_size, self.in_features)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        base = _PackedLinearFn.apply(x.to(dtype), self.packed, self.scale, self.offset, bias,
                                     self.bits, self.in_features)
        a = self.dropout(self.pool(x)).to(self.lora_A.dtype)
        lora = F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling
        return base + lora.to(base.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}")


class QALoRALinear(LowRankOnQuantized):
    """Frozen group-wise quantized linear with a QA-LoRA adapter.

    ``y = x W_q^T + b + s * B(A(dropout(pool(x))))`` where ``pool`` sums ``x`` within each
    quantization group: ``(..., in) -> (..., in // group_size)``. ``lora_A`` has shape
    ``(r, in // group_size)`` and ``lora_B`` ``(out, r)``; ``B`` starts at zero so the
    untrained layer equals the quantized base exactly.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, rank: int, alpha: float,
                 dropout: float = 0.0, adapter_dtype: torch.dtype = torch.float32, train_scales: bool = False,
                 scales_granularity: str = "group"):
        super().__init__(qt, bias, rank, alpha, dropout, adapter_dtype, qt.in_features // qt.group_size)
        self.channel_scale = None
        if train_scales and scales_granularity == "channel":
            # one learned factor per output row on the frozen per-group scales: scale * factor
            self.channel_scale = nn.Parameter(torch.ones(self.out_features, 1, device=qt.scale.device))
        elif train_scales:
            # learned scales: a trainable fp32 parameter in place of the buffer (same name, so the
            # merge, the checkpoints and every export read it as they read the frozen one)
            scale = self.scale
            del self.scale
            self.scale = nn.Parameter(scale.detach().float().clone())

    @property
    def train_scales(self) -> bool:
        return self.channel_scale is not None or (isinstance(self.scale, nn.Parameter) and self.scale.requires_grad)

    def current_scale(self) -> torch.Tensor:
        """The per-group scales the layer computes with, ``(out, groups)``: the frozen or learned
        ones, times the learned per-row factor where there is one (the same fp32 product forward
        takes, so the merge holds exactly what was trained)."""
        return self.scale if self.channel_scale is None else self.scale * self.channel_scale

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Sum within groups, in fp32: ``(..., in) -> (..., in // group_size)``."""
        return x.unflatten(-1, (-1, self.group_size)).sum(-1, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused function (:class:`_QALoRAFn`): the adapter folded into the dequantized weight."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        mask = None
        if self.training and self.dropout_p > 0:
            groups = self.in_features // self.group_size
            mask = F.dropout(torch.ones(*x.shape[:-1], groups, device=x.device), self.dropout_p)
        return _QALoRAFn.apply(x, self.lora_A, self.lora_B, self.packed, self.current_scale(), self.offset, bias, mask,
                               self.scaling, self.bits, self.group_size)

    def delta_offset(self) -> torch.Tensor:
        """What the adapter adds to every weight of a group: ``s * B @ A``, ``(out, groups)``."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


class LoRALinear(LowRankOnQuantized):
    """The baseline QA-LoRA is compared with (QLoRA-style): a full-width ``lora_A`` ``(r, in)``
    on the same frozen quantized base. Its update ``s * B @ A`` varies within a group, so it
    cannot be folded into the offsets: merging needs a 16-bit weight and a second quantization
    (see ``merge.merge_and_requantize``). A sibling of :class:`QALoRALinear`, not a subclass, so
    no ``isinstance`` check mistakes one for the other.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, rank: int, alpha: float,
                 dropout: float = 0.0, adapter_dtype: torch.dtype = torch.float32):
        super().__init__(qt, bias, rank, alpha, dropout, adapter_dtype, qt.in_features)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def dense_weight(self) -> torch.Tensor:
        """The 16-bit merged weight ``dequant(W_q) + s * B @ A``, ``(out, in)`` fp32."""
        return self.quantized().dequantize() + self.scaling * (self.lora_B.float() @ self.lora_A.float())


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
