"""PyTorch backend: the merged model's ``QuantLinear`` layers, on the int4 kernel where it applies.

``generate`` runs in its own thread and hands each new token over a queue; closing the stream
stops it after the token being computed (a stopping criterion checks a flag), so an abandoned
reply does not keep the model busy.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

from . import Runtime, context_length, end_ids


class PyTorchRuntime(Runtime):
    def __init__(self, model, tokenizer, n_ctx: int, reason: str = ""):
        from ..export.native import quantized_modules

        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        super().__init__(tokenizer, end_ids(tokenizer, model.config.eos_token_id, generation_eos), n_ctx, reason)
        self.model = model
        self.device = next(model.parameters()).device
        layers = quantized_modules(model).values()
        if any(m.kernel_active(self.device) for m in layers):
            self.name = "PyTorch int4 kernel"
        else:
            self.name = "PyTorch (dequantize + matmul)" if layers else f"PyTorch ({str(model.dtype).removeprefix('torch.')})"

    def _tokens(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None) -> Iterator[int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from ..infer import _generation_kwargs

        handed: queue.Queue = queue.Queue()
        closed = threading.Event()

        class Streamer(BaseStreamer):
            prompt = True

            def put(self, value):
                if self.prompt:  # generate hands the prompt over first
                    self.prompt = False
                    return
                handed.put(value.reshape(-1).tolist())

            def end(self):
                handed.put(None)

        class Closed(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), closed.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs = _generation_kwargs(self.tokenizer, max_new_tokens, temperature, top_p, model=self.model)
        kwargs["eos_token_id"] = sorted(self.end_ids) or None
        if temperature > 0:
            kwargs["top_k"] = 0  # temperature and top-p alone, as the llama.cpp backend samples
        x = torch.tensor([ids], dtype=torch.long, device=self.device)

        def run():
            try:
                if seed is not None:
                    torch.manual_seed(int(seed))
                with torch.inference_mode():
                    self.model.generate(x, attention_mask=torch.ones_like(x), streamer=Streamer(),
                                        stopping_criteria=StoppingCriteriaList([Closed()]), **kwargs)
            except BaseException as exc:  # raised in the reader's thread below
                handed.put(exc)
                handed.put(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            while (item := handed.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            closed.set()
            thread.join()  # the model is free again before the next stream starts


def dispatch(merged: Path, device) -> Runtime:
    import torch

    from ..export.native import load_quantized

    # bf16 activations pair with the int4 kernel (CPU and CUDA); scales and offsets stay fp32
    model, tokenizer = load_quantized(merged, device=device, dtype=torch.bfloat16)
    where = "a CUDA GPU" if torch.device(device).type == "cuda" else f"the {torch.device(device).type.upper()}"
    return PyTorchRuntime(model, tokenizer, context_length(model.config.to_dict()), f"merged model on {where}")
