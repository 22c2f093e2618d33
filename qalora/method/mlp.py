"""The gated MLP's ``silu(gate) * up`` as one function that keeps two tensors for backward, not three.

LLaMA-family MLPs compute ``down(silu(gate(x)) * up(x))``. Autograd keeps ``gate(x)`` for the
SiLU's backward and both ``silu(gate(x))`` and ``up(x)`` for the product's: three tensors of the
intermediate width (2.7x the hidden width in LLaMA) per token and layer, the largest share of a
decoder layer's saved activations. Recomputing ``silu`` from ``gate(x)`` in backward (one
elementwise pass) keeps two (as Liger's fused SwiGLU does). The QA-LoRA projections around it
keep no activation of their own beyond their group sums (:class:`qalora.method.layer._QALoRAFn`).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        # what autograd computes for F.silu(gate) * up, in the same dtypes: the product's gradient
        # to the SiLU's output, then SiLU's own fused backward
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_out * F.silu(gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` that saves ``gate`` and ``up`` only; shapes ``(..., intermediate)``."""
    return _SiLUMul.apply(gate, up)


def _gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation
    return isinstance(act, (nn.SiLU, SiLUActivation))


def lean_gated_mlps(model: nn.Module) -> int:
    """Give every LLaMA-style MLP of ``model`` (``gate_proj``, ``up_proj``, ``down_proj``, SiLU) the
    lean activation, in place; returns how many. The computation is unchanged."""
    count = 0
    for m in model.modules():
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _is_silu(m.act_fn):
            m.forward = types.MethodType(_gated_forward, m)
            count += 1
    return count
