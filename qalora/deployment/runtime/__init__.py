"""Runtimes that answer with a finished model: llama.cpp on its GGUF file, or PyTorch.

The chat (app and CLI) and the OpenAI-compatible server open one through :func:`open_runtime`,
which tries each backend in ``BACKENDS`` order and takes the first that can run the model here:

=============  =================================================  ==============================
backend        when                                               file
=============  =================================================  ==============================
llama.cpp      CPU, and the model has (or can have) a GGUF export  ``RUN/exports/model-*.gguf``
pytorch        anywhere else: CUDA, or no GGUF possible            ``RUN/merged`` (int4 kernel)
=============  =================================================  ==============================

Every backend tokenizes and detokenizes with the model's own tokenizer (the prompt is
``qalora.data.records.encode_prompt``, the training format) and only computes next tokens, so both feed
the same token ids and turn the same ids into the same text; they stop on the same end ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qalora.deployment.runtime.base import Runtime
from qalora.errors import ConfigError, ModelError


@dataclass
class Backend:
    """``open(merged_dir, device)`` returns a Runtime, or a sentence saying why it cannot run here."""

    name: str
    open: Callable[[Path, object], "Runtime | str"]
    aliases: tuple = field(default_factory=tuple)


def _backends() -> list[Backend]:
    from qalora.deployment.runtime import llamacpp, pytorch
    return [Backend("llama.cpp", llamacpp.dispatch, ("llamacpp", "gguf")),
            Backend("pytorch", pytorch.dispatch, ("torch",))]


PREFER = ("auto", "llama.cpp", "pytorch")


def open_runtime(model_dir, device=None, prefer: str = "auto") -> Runtime:
    """The runtime that answers for the finished model in ``model_dir`` (a run or its merged folder).

    ``device``: default ``qalora.models.model.pick_device()``. ``prefer``: "auto" (first backend that can
    run here), or one backend by name, which raises ``ModelError`` with the reason if it cannot.
    The runtime's ``reason`` says why it answers.
    """
    from qalora.deployment.export import run_parts
    from qalora.deployment.export.native import read_quant_config

    merged, _ = run_parts(model_dir)
    read_quant_config(merged)  # a clear error for a folder that is not a finished model
    if device is None:
        from qalora.models.model import pick_device
        device = pick_device()
    backends = [b for b in _backends() if prefer == "auto" or prefer in (b.name, *b.aliases)]
    if not backends:
        raise ConfigError(f"runtime {prefer!r} is unknown; choose one of {', '.join(PREFER)}.")
    skipped = []
    for backend in backends:
        got = backend.open(merged, device)
        if isinstance(got, Runtime):
            if skipped:
                got.reason = f"{got.reason}; " + "; ".join(skipped)
            return got
        skipped.append(f"not {backend.name}: {got}")
    raise ModelError(f"the {prefer} runtime cannot run this model here: " + "; ".join(skipped))
