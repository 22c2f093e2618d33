"""``torch.compile`` where it pays, and the one switch that turns it off.

``QALORA_COMPILE`` decides: ``auto`` (the default) and ``1`` compile, ``0`` runs everything eager.
The eager code is the reference the compiled code is tested against. What is compiled:

- each decoder layer while a model trains (:func:`decoder_layers_compiled`): the dequantization
  of every packed weight becomes one fused kernel per layer and pass (unpack, scale, offset plus
  the adapter, round), and the norms, rotary embeddings, SiLU gate and residual adds fuse around
  the matmuls. Every layer of one shape shares one graph, so a model compiles once per shape of
  batch (and once more for evaluation, under ``no_grad``);
- the one-token decode step of the PyTorch runtime (:mod:`qalora.deployment.decode`), with CUDA graphs on
  CUDA (``mode="reduce-overhead"``).

Measured (``bench/train_step.py``, SmolLM2-135M shape, 4 x 256 tokens, bf16, the 2-core CPU):
the step took 1.35-1.39 s eager and 0.95 s compiled, after about 10 s of compiling in the first
step; a job breaks even after some 25 steps. ``auto`` therefore compiles training on every
device, but skips runs shorter than :data:`MIN_STEPS` on the CPU, where compiling would cost more
than it saves; decoding compiles on CUDA only.
"""
from __future__ import annotations

import contextlib
import os

import torch

from qalora.errors import ConfigError

CHOICES = ("auto", "0", "1")
MIN_STEPS = 30  # CPU, auto: shorter runs stay eager (compiling costs ~25 steps of the default model)


def setting() -> str:
    value = os.environ.get("QALORA_COMPILE", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(f"QALORA_COMPILE={value!r} is not one of {', '.join(CHOICES)}: 'auto' compiles where it "
                          "pays, '1' always, '0' never (everything runs eager).")
    return value


def enabled(device: torch.device | str, steps: int | None = None) -> bool:
    """Whether work on ``device`` runs compiled: never on ``meta`` (tracing tests stay eager), never
    with ``QALORA_COMPILE=0``. Under ``auto`` the CPU compiles only training runs of ``steps`` >=
    ``MIN_STEPS``; decoding (no ``steps``) stays eager there, where the chat answers on llama.cpp
    and a first reply must not wait for a compile."""
    device = torch.device(device)
    value = setting()
    if device.type == "meta" or value == "0":
        return False
    if value == "auto" and device.type == "cpu":
        return steps is not None and steps >= MIN_STEPS
    return True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (``model.model.layers`` for LLaMA-family models), or none."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


@contextlib.contextmanager
def decoder_layers_compiled(model: torch.nn.Module, device: torch.device | str, steps: int | None = None):
    """Run the model's decoder layers compiled inside the block (where :func:`enabled`), eager again
    after it: the merge swaps their linears and the merge check runs in another dtype, each of which
    would cost a recompile for a graph used once. Yields how many layers were compiled."""
    layers = decoder_layers(model) if enabled(device, steps) else []
    for layer in layers:
        layer.compile(dynamic=None)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: calls go eager again
