"""Chat generation with transformers' ``generate`` on a loaded model, streamed as it grows."""
from __future__ import annotations

import threading
from typing import Iterator

import torch


def chat_input_ids(tokenizer, messages: list[dict], device=None) -> torch.Tensor:
    """``messages`` rendered exactly as in training, ready for the next reply: ``(1, T)``."""
    from qalora.data.records import encode_prompt
    ids = torch.tensor([encode_prompt(messages, tokenizer)], dtype=torch.long)
    return ids if device is None else ids.to(device)


def _generation_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float, model=None) -> dict:
    """``generate`` arguments that stop on every end id: the tokenizer's eos and each of the
    model's ``generation_config.eos_token_id`` (Llama-3 instruct lists ``<|end_of_text|>`` and
    ``<|eot_id|>``; passing one id would override that list)."""
    from qalora.deployment.runtime.base import end_ids

    eos = end_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos or None)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def stream_chat(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 0.95) -> Iterator[str]:
    """Yield the reply's text as it grows (transformers' ``TextIteratorStreamer``)."""
    from transformers import TextIteratorStreamer

    ids = chat_input_ids(tokenizer, messages, next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, model=model)
    errors: list[BaseException] = []

    def _run():
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
        except BaseException as exc:  # surfaced to the caller below, after the stream ends
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]


def chat(model, tokenizer, messages: list[dict], **kwargs) -> str:
    reply = ""
    for reply in stream_chat(model, tokenizer, messages, **kwargs):
        pass
    return reply
