"""Chat with finished models: one loaded model per side, kept between turns, freed on switch.

The app process holds at most two models: the fine-tuned low-bit one ("tuned", keyed by its
merged directory, answered by the runtime ``qalora.deployment.runtime.open_runtime`` picks: llama.cpp on
the run's GGUF file on a CPU, PyTorch's int4 path on CUDA or where no GGUF is possible) and, for
side-by-side mode, its base ("base", keyed by the base name: on a CPU in llama.cpp from the base's
own GGUF file where it is one, as the default base is, else the float model in PyTorch). Asking a
slot for a different key frees the model it holds before loading the next, so switching models
never stacks memory. torch is imported lazily: the app starts without it.

Side by side, each side loads in a thread of its own and answers as soon as it is loaded: the
fine-tuned reply streams while the base is still loading.
"""
from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator

SIDES = ("tuned", "base")


def _free_memory() -> None:
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelSlot:
    """Holds at most one loaded model; ``get(key)`` loads ``key``, replacing the previous one.

    A reply already streaming from the previous model keeps its own reference and finishes;
    the memory is released when it does.
    """

    def __init__(self, loader: Callable[[str], object]):
        self._loader = loader
        self._lock = threading.Lock()
        self.key: str | None = None
        self._loaded = None

    @property
    def loaded(self):
        """The model held now, or ``None``."""
        return self._loaded

    def get(self, key: str):
        with self._lock:
            if key != self.key or self._loaded is None:
                self._release()
                self._loaded = self._loader(key)
                self.key = key
            return self._loaded

    def unload(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._loaded is not None:
            self._loaded, self.key = None, None
            _free_memory()


def _load_tuned(merged_dir: str):
    from qalora.deployment.runtime import open_runtime

    return open_runtime(merged_dir)


def _load_base(base: str):
    from qalora.models.model import load_base, pick_device, resolve_dtype
    from qalora.deployment.runtime.base import context_length
    from qalora.deployment.runtime.llamacpp import open_gguf_base
    from qalora.deployment.runtime.pytorch import PyTorchRuntime

    device = pick_device()
    runtime = open_gguf_base(base, device)
    if not isinstance(runtime, str):
        return runtime
    model, tok = load_base(base, dtype=resolve_dtype("auto", device), device=device)
    return PyTorchRuntime(model, tok, context_length(model.config.to_dict()), f"float base model on {device}")


_SLOTS = {"tuned": ModelSlot(_load_tuned), "base": ModelSlot(_load_base)}


def slot(side: str) -> ModelSlot:
    if side not in _SLOTS:
        raise ValueError(f"chat side {side!r} is unknown; use one of {SIDES}.")
    return _SLOTS[side]


def loaded_models() -> dict[str, str | None]:
    """Which key each side holds right now (``None``: nothing loaded)."""
    return {side: s.key for side, s in _SLOTS.items()}


def runtime_of(side: str) -> dict | None:
    """What answers on ``side`` now: ``{"name", "reason"}`` of its runtime (``None``: nothing loaded)."""
    loaded = slot(side).loaded
    return None if loaded is None else {"name": loaded.name, "reason": loaded.reason}


def text_of(content) -> str:
    """A chat message's text, whether a plain string or a list of typed parts (Gradio's format)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def build_messages(history: list[dict], user_message: str, system_prompt: str = "") -> list[dict]:
    """The conversation to answer: optional system prompt, earlier turns as text, the new message."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    messages += [{"role": m["role"], "content": text_of(m["content"])} for m in history
                 if m.get("role") in ("user", "assistant")]
    return messages + [{"role": "user", "content": user_message}]


def stream_reply(side: str, key: str, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 0.95) -> Iterator[str]:
    """Yield the growing reply of the model ``key`` on ``side`` (loaded on first use)."""
    if not 1 <= int(max_new_tokens) <= 4096:
        raise ValueError(f"max new tokens={max_new_tokens} must be between 1 and 4096.")
    if not 0.0 <= float(temperature) <= 2.0 or not 0.0 < float(top_p) <= 1.0:
        raise ValueError("temperature must be in [0, 2] and top-p in (0, 1]; 0 temperature means greedy.")
    runtime = slot(side).get(key)
    yield from runtime.stream_chat(messages, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                   top_p=float(top_p))


def _import_loaders() -> None:
    """Import what the loaders use, here, before two load threads do it at once: transformers
    resolves its names lazily, and two threads resolving them together in a fresh process got
    "cannot import name 'AutoTokenizer'" (seen on the first side-by-side turn after a start)."""
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import qalora.models.model  # noqa: F401
    import qalora.deployment.runtime.llamacpp  # noqa: F401
    import qalora.deployment.runtime.pytorch  # noqa: F401


class _Loading(threading.Thread):
    """Loads one side's model (``slot(side).get(key)``) in the background; ``error`` if it failed."""

    def __init__(self, side: str, key: str, done: threading.Event):
        super().__init__(name=f"chat-load-{side}", daemon=True)
        self.side, self.key, self.done, self.error = side, key, done, None
        self.start()

    def run(self):
        try:
            slot(self.side).get(self.key)
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc
        finally:
            self.done.set()


def stream_side_by_side(requests: dict[str, tuple[str, list[dict]]], poll_s: float = 0.5,
                        **generation) -> Iterator[dict[str, str | None]]:
    """Answer each side's conversation at once; ``requests`` maps side -> (model key, messages).

    Yields ``{side: reply so far}``, ``None`` for a side whose model is still loading. Each side
    loads in a thread of its own and starts answering as soon as it is loaded, so a quick side's
    reply streams while the other loads; while nothing grows an update comes every ``poll_s``
    seconds (the caller shows the wait). Each read of a runtime's stream computes its next token,
    so taking turns reading the sides keeps every reply growing on screen together. A side's load
    error is raised when it comes, after whatever the other side has said by then.
    """
    for side in requests:
        slot(side)  # an unknown side is refused before anything loads
    _import_loaders()
    done = threading.Event()  # set by each load as it ends
    loading = {side: _Loading(side, key, done) for side, (key, _) in requests.items()}
    streams: dict[str, Iterator[str]] = {}
    replies: dict[str, str | None] = dict.fromkeys(requests)
    while loading or streams:
        done.clear()  # before looking: a load ending after the look leaves it set
        for side, job in list(loading.items()):
            if not job.is_alive():
                del loading[side]
                if job.error is not None:
                    raise job.error
                key, messages = requests[side]
                streams[side], replies[side] = stream_reply(side, key, messages, **generation), ""
        grew = False
        for side in list(streams):
            try:
                replies[side], grew = next(streams[side]), True
            except StopIteration:
                del streams[side]
        if grew:
            yield dict(replies)
        elif loading and not done.wait(poll_s):
            yield dict(replies)  # still loading: the caller shows the wait
