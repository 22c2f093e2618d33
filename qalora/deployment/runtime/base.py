"""What every runtime is: one loaded model that streams replies, one request at a time.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from qalora.errors import ConfigError

MAX_CONTEXT = 8192  # tokens of KV cache at most, whatever the model's positions allow


@dataclass
class Generation:
    """A reply so far: its text, token counts and, once finished, why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (end id or stop string) or "length"


class ContextError(ConfigError):
    """The prompt and the tokens asked for do not fit in the model's context window."""


class Busy(Exception):
    """Another generation held the runtime for longer than the caller would wait."""


class Runtime:
    """A loaded model that turns prompt token ids into reply tokens; backends implement ``_tokens``.

    One generation runs at a time (a lock held while a stream is open): a second caller waits.
    """

    name = "runtime"

    def __init__(self, tokenizer, end_ids: list[int], context_length: int, reason: str = ""):
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.context_length = int(context_length)
        self.reason = reason  # why this backend answers here (and why an earlier one did not)
        self._lock = threading.Lock()

    def _tokens(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None) -> Iterator[int]:
        """Yield the next token ids after ``ids`` (sampled as asked) until closed or exhausted."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model's memory now (it is also freed when the runtime is collected)."""

    def clear_cache(self) -> None:
        """Forget any state kept from earlier prompts, so the next prompt is evaluated whole."""

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """``messages`` rendered exactly as in training, ready for the next reply."""
        from qalora.data.records import encode_prompt
        return encode_prompt(messages, self.tokenizer)

    def text_ids(self, prompt: str) -> list[int]:
        """A plain-text prompt's ids, with the special tokens the tokenizer adds (e.g. BOS)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt + max_new_tokens > self.context_length:
            raise ContextError(
                f"This model's maximum context length is {self.context_length} tokens, but the prompt has {n_prompt} "
                f"and {max_new_tokens} more were asked for ({n_prompt + max_new_tokens} in all); shorten the "
                f"conversation or ask for at most {max(self.context_length - n_prompt, 0)} new tokens.")

    def stream(self, ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.95,
               stop: list[str] | tuple = (), seed: int | None = None,
               wait_s: float | None = None) -> Iterator[Generation]:
        """Yield the reply to ``ids`` as it grows; the last item carries ``finish_reason``.

        ``temperature`` 0 is greedy; a ``stop`` string ends the reply before it (OpenAI's rule).
        Text is yielded only when it grows and does not end inside a multi-byte character.
        ``wait_s``: how long to wait for a generation already running (default: as long as it
        takes); past it :class:`Busy` is raised. The runtime is held until the stream ends or is
        closed.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max new tokens={max_new_tokens} must be at least 1.")
        self.check_fits(len(ids), max_new_tokens)
        stop = [s for s in stop if s]
        if not self._lock.acquire(timeout=-1 if wait_s is None else max(wait_s, 0.0)):
            raise Busy(f"another reply held the model for over {wait_s:g} s")
        try:
            made: list[int] = []
            text, shown, reason = "", "", "length"
            tokens = self._tokens(list(ids), max_new_tokens, float(temperature), float(top_p), seed)
            try:
                for token in tokens:
                    if token in self.end_ids:
                        reason = "stop"
                        break
                    made.append(token)
                    text = self.tokenizer.decode(made, skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if cut >= 0:
                        text, reason = text[:cut], "stop"
                        break
                    ready = text[:len(text) - _pending(text, stop)]
                    if len(ready) > len(shown) and not ready.endswith("\ufffd"):
                        shown = ready
                        yield Generation(shown, len(ids), len(made))
                    if len(made) >= max_new_tokens:
                        break
            finally:
                tokens.close()
            yield Generation(text, len(ids), len(made), reason)
        finally:
            self._lock.release()

    def stream_chat(self, messages: list[dict], **generation) -> Iterator[str]:
        """Yield the reply's text as it grows (as ``qalora.deployment.generate.stream_chat`` does)."""
        for g in self.stream(self.chat_ids(messages), **generation):
            yield g.text

    def generate(self, ids: list[int], **generation) -> Generation:
        for g in self.stream(ids, **generation):
            pass
        return g

    def chat(self, messages: list[dict], **generation) -> Generation:
        return self.generate(self.chat_ids(messages), **generation)

    def complete(self, prompt: str, **generation) -> Generation:
        return self.generate(self.text_ids(prompt), **generation)


def _pending(text: str, stop: list[str]) -> int:
    """Characters at the end of ``text`` held back because a stop string may begin there."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def end_ids(tokenizer, *eos_token_ids) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and each ``eos_token_id`` given (one id or a
    list, from the model's config or generation config; Llama-3 instruct lists ``<|end_of_text|>``
    and ``<|eot_id|>``)."""
    ids = [tokenizer.eos_token_id]
    for eos in eos_token_ids:
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys(i for i in ids if i is not None))


def context_length(config: dict) -> int:
    return min(int(config.get("max_position_embeddings") or MAX_CONTEXT), MAX_CONTEXT)
