"""llama.cpp backend: the model's GGUF export, run on the CPU by llama-cpp-python.

The file is the one the user downloads or publishes, ``RUN/exports/model-q4_1.gguf`` (8-bit:
``model-f16.gguf``). A job that did not export it gets it written on first use by ``export_run``,
under a temporary name renamed into place, and reused afterwards. The GGUF holds the same codes
as the merged model with scales and offsets rounded to fp16 (see ``qalora.deployment.export.gguf``).

Prompts are tokenized by the model's tokenizer and fed to llama.cpp as ids, so llama.cpp sees the
training format token for token; llama.cpp keeps the KV cache of the longest common prefix
between calls, so a chat's next turn only evaluates the new messages.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Iterator

from qalora.deployment.runtime.base import MAX_CONTEXT, Runtime, context_length, end_ids
from qalora.errors import ConfigError, ModelError


def ensure_gguf(merged: Path) -> tuple[Path, bool]:
    """``(path, written now)``: the run's GGUF export, written if missing or older than the model."""
    from qalora.deployment.export import export_run, run_gguf_path
    from qalora.deployment.export.native import WEIGHTS, read_quant_config

    path = run_gguf_path(merged, int(read_quant_config(merged)["bits"]))
    if path.is_file() and path.stat().st_mtime >= (merged / WEIGHTS).stat().st_mtime:
        return path, False
    return Path(export_run(merged, "gguf")["path"]), True


# llama.cpp's file types (``general.file_type``) by number, as its tools name them.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 32: "BF16"}


def file_type(metadata: dict, path: Path) -> str:
    """The GGUF file's weight type as llama.cpp names it (``Q4_1``, ``F16``…), from its metadata."""
    number = metadata.get("general.file_type")
    if number is not None and str(number).isdigit() and int(number) in FILE_TYPES:
        return FILE_TYPES[int(number)]
    return "F16" if path.name.endswith("f16.gguf") else "Q4_1"


class LlamaCppRuntime(Runtime):
    def __init__(self, path: Path, tokenizer, ends: list[int], n_ctx: int, threads: int, reason: str = ""):
        import llama_cpp

        super().__init__(tokenizer, ends, n_ctx, reason)
        self.path = Path(path)
        self._llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                    verbose=False)
        self.name = f"llama.cpp (GGUF {file_type(self._llm.metadata, self.path)})"
        # freed when collected or, at the latest, at exit while llama_cpp's module is still whole
        self._free = weakref.finalize(self, self._llm.close)

    def _tokens(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None) -> Iterator[int]:
        import llama_cpp

        self._llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else int(seed))
        # Greedy, or temperature and top-p alone (no top-k, min-p or repeat penalty), like PyTorch's path.
        sampling = (dict(temp=0.0, top_k=1) if temperature == 0 else
                    dict(temp=temperature, top_p=top_p, top_k=0, min_p=0.0))
        return self._llm.generate(ids, repeat_penalty=1.0, **sampling)

    def clear_cache(self) -> None:
        with self._lock:
            self._llm.reset()

    def close(self) -> None:
        with self._lock:
            self._free()


def _cannot_run(device) -> str | None:
    """Why llama.cpp cannot answer on ``device`` here, or ``None`` if it can."""
    import torch

    if torch.device(device).type != "cpu":
        return f"llama-cpp-python runs on the CPU here and the device is {device}"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed"
    return None


def dispatch(merged: Path, device) -> Runtime | str:
    """The llama.cpp runtime for ``merged`` on ``device``, or why it cannot run there."""
    import torch
    from transformers import AutoTokenizer

    from qalora.deployment.export.formats import gguf_fits
    from qalora.deployment.export.native import read_quant_config

    if why := _cannot_run(device):
        return why
    qc = read_quant_config(merged)
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    if not gguf_fits(bits, group_size):
        return (f"group size {group_size} is not a multiple of 32, so no GGUF Q4_1 file holds this model "
                "exactly")
    try:
        path, written = ensure_gguf(merged)
    except (ConfigError, ModelError) as exc:
        return f"no GGUF file is possible ({exc})"
    except OSError as exc:
        return f"its GGUF file could not be written ({exc.strerror or exc})"
    config = json.loads((merged / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reason = f"CPU, with the run's GGUF export exports/{path.name}" + (" (written for this chat)" if written else "")
    return LlamaCppRuntime(path, tokenizer, end_ids(tokenizer, config.get("eos_token_id")), context_length(config),
                           torch.get_num_threads(), reason)


def open_gguf_base(name: str, device) -> Runtime | str:
    """The llama.cpp runtime for a base model given as a GGUF file (``'default'`` is one), or why
    not: the base answers from its own file, as a user of llama.cpp would run it."""
    import torch
    from transformers import AutoTokenizer

    from qalora.models.model import DEFAULT_MODEL, default_gguf_path

    if name != DEFAULT_MODEL and not name.endswith(".gguf"):
        return "the base has no GGUF file"
    if why := _cannot_run(device):
        return why
    import llama_cpp

    path = default_gguf_path() if name == DEFAULT_MODEL else Path(name).expanduser()
    if not path.is_file():
        return f"GGUF file {path} does not exist"
    # The file's own metadata, read by llama.cpp from its vocabulary alone (a fraction of a second;
    # transformers parses the whole file for its config, seconds).
    header = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        meta = dict(header.metadata)
    finally:
        header.close()
    arch = meta.get("general.architecture", "llama")
    n_ctx = context_length({"max_position_embeddings": int(meta.get(f"{arch}.context_length") or MAX_CONTEXT)})
    eos = meta.get("tokenizer.ggml.eos_token_id")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return LlamaCppRuntime(path, tokenizer, end_ids(tokenizer, None if eos is None else int(eos)), n_ctx,
                           torch.get_num_threads(), f"CPU, with the base's own GGUF file {path.name}")
