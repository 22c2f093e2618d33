"""PyTorch backend: the merged model's ``QuantLinear`` layers, on the int4 kernel where it applies.

Where compiling is on (``qalora.compiled``: on CUDA by default) tokens come from
:class:`qalora.deployment.decode.StaticDecoder`: a static KV cache and a compiled one-token step (CUDA graphs on
CUDA). Elsewhere, a plain decode loop over a growing KV cache (the steps ``generate`` takes: the
prompt once, then one token at a time, logits of the last position only): the reference the
compiled path's greedy tokens are tested against. Either way tokens are made in step with the
reader: each ``next`` computes one token, and a reader that stops reading stops the work.
Measured on the 2-core CPU: ``generate`` in a second thread, as a streamer needs, decoded at
26-28 tokens/s where the same call in the calling thread made 37-40.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from qalora.deployment.runtime.base import Runtime, context_length, end_ids


class PyTorchRuntime(Runtime):
    def __init__(self, model, tokenizer, n_ctx: int, reason: str = ""):
        from qalora import compiled
        from qalora.deployment.export.native import quantized_modules

        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        super().__init__(tokenizer, end_ids(tokenizer, model.config.eos_token_id, generation_eos), n_ctx, reason)
        self.model = model
        self.device = next(model.parameters()).device
        self.static = compiled.enabled(self.device)  # static cache + compiled step
        self._decoder = None
        layers = quantized_modules(model).values()
        if any(m.kernel_active(self.device) for m in layers):
            self.name = "PyTorch int4 kernel"
        else:
            self.name = "PyTorch (dequantize + matmul)" if layers else f"PyTorch ({str(model.dtype).removeprefix('torch.')})"
        if self.static:
            self.name += ", static cache + " + ("CUDA graphs" if self.device.type == "cuda" else "compiled step")

    def _decoder_for(self, needed: int):
        """The static decoder, with a cache of at least ``needed`` tokens (a longer one is built, and
        compiled once more, when a reply needs it)."""
        from qalora.deployment.decode import StaticDecoder, cache_length

        if self._decoder is None or self._decoder.max_len < needed:
            if self._decoder is not None:
                self._decoder.close()
            self._decoder = StaticDecoder(self.model, cache_length(needed, self.context_length))
        return self._decoder

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def _tokens(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None) -> Iterator[int]:
        import torch

        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(self.device).manual_seed(int(seed))
        if self.static:
            decoder = self._decoder_for(len(ids) + max_new_tokens)
            prefill, step = decoder.prefill, decoder.step
        else:
            prefill, step = self._eager()
        logits = prefill(ids)
        for _ in range(max_new_tokens):
            token = _pick(logits, temperature, top_p, generator)
            yield token
            logits = step(token)

    def _eager(self):
        """``(prefill(ids), step(token))``, each returning the next logits, over a growing cache:
        the reference decode loop."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)

        def forward(x: list[int]) -> torch.Tensor:
            # inference mode per call: a generator must not leave it switched on in its reader's thread
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([x], device=self.device), past_key_values=cache,
                                 use_cache=True, logits_to_keep=1)
                return out.logits[0, -1].float()

        return forward, lambda token: forward([token])


def _pick(logits, temperature: float, top_p: float, generator) -> int:
    """Greedy at temperature 0, else a sample from the top-p nucleus of ``softmax(logits / T)``.

    Args:
        logits: float ``(vocab,)``.
    """
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= top_p  # tokens past the nucleus (the first always stays)
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def dispatch(merged: Path, device) -> Runtime:
    import torch

    from qalora.deployment.export.native import load_quantized

    # bf16 activations pair with the int4 kernel (CPU and CUDA); scales and offsets stay fp32
    model, tokenizer = load_quantized(merged, device=device, dtype=torch.bfloat16)
    where = "a CUDA GPU" if torch.device(device).type == "cuda" else f"the {torch.device(device).type.upper()}"
    return PyTorchRuntime(model, tokenizer, context_length(model.config.to_dict()), f"merged model on {where}")
