"""Decoding at the hardware's pace: a static KV cache and a compiled one-token step.

At batch 1 a decode step is a few hundred small kernels (30 layers x norms, seven projections,
rotary, attention), each launched from Python: on a GPU the launches, not the arithmetic, set the
pace (a 135M model decoded at 10-17 tokens/s on an H200 with eager ``generate``). gpt-fast's
recipe removes them: the KV cache is allocated once for the whole reply (``StaticCache``) so every
step has the same shapes, and the step is compiled; with ``mode="reduce-overhead"`` on CUDA it is
captured as a CUDA graph and replayed, one launch a token. The prompt runs eager (its length
varies), then every token goes through the compiled step.

The eager loop over a growing cache (:meth:`qalora.deployment.runtime.pytorch.PyTorchRuntime._tokens`
without this) is the reference: greedy tokens are the same (``tests/test_decode.py``).
"""
from __future__ import annotations

import torch

MIN_CACHE = 256  # cache lengths are powers of two from here: few shapes, few compiles


def cache_length(needed: int, limit: int) -> int:
    """The static cache length for a prompt plus reply of ``needed`` tokens: the next power of two
    (at least :data:`MIN_CACHE`), at most ``limit`` (the model's context)."""
    length = MIN_CACHE
    while length < needed:
        length *= 2
    return max(min(length, limit), needed)


class StaticDecoder:
    """Prefill a prompt, then step one token at a time, over one preallocated KV cache.

    ``compile``: run the step through ``torch.compile`` (CUDA graphs on CUDA). The int4 kernel's
    weights are prepared before, so the compiled graph only reads them. Every model call runs on
    one thread of the decoder's own: CUDA graphs are recorded per thread, and a server or the chat
    asks from whichever thread serves the request.
    """

    def __init__(self, model, max_len: int, compile: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        from transformers import StaticCache

        from qalora.method.quantlinear import QuantLinear

        self.model, self.max_len = model, max_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.prepare_kernel()
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._step = torch.compile(self._forward_one, mode=mode, fullgraph=True, dynamic=False) if compile \
            else self._forward_one
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalora-decode")

    def _forward_one(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Forget the last reply, run the prompt ``ids`` eagerly; returns the next token's logits
        ``(vocab,)`` fp32."""
        if len(ids) >= self.max_len:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit a cache of {self.max_len}")
        return self._thread.submit(self._prefill, ids).result()

    def step(self, token: int) -> torch.Tensor:
        """Feed one token; returns the next token's logits ``(vocab,)`` fp32 (a fresh tensor: on
        CUDA the graph's own output buffer is overwritten by the next step)."""
        return self._thread.submit(self._one, token).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    @torch.inference_mode()
    def _prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache.reset()
        x = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def _one(self, token: int) -> torch.Tensor:
        return self._step(torch.tensor([[token]], device=self.device))[0].clone()
