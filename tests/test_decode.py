"""The static-cache, compiled decode step against the eager loop over a growing cache."""
import threading

import pytest
import torch

from helpers import tiny_qalora
from qalora.deployment.decode import MIN_CACHE, StaticDecoder, cache_length
from qalora.method.merge import merge_adapters
from qalora.deployment.runtime.pytorch import PyTorchRuntime

PROMPT = [5, 17, 33, 2, 90, 11, 250, 7]


def test_cache_lengths_are_few_powers_of_two_within_the_context():
    assert cache_length(10, 8192) == MIN_CACHE == 256
    assert cache_length(257, 8192) == 512 and cache_length(3000, 8192) == 4096
    assert cache_length(3000, 2048) == 3000  # never less than needed: the runtime refuses those earlier
    assert cache_length(300, 400) == 400


@pytest.fixture(scope="module")
def merged():
    model, tok = tiny_qalora()
    return merge_adapters(model).eval(), tok


def test_compiled_static_decoding_equals_the_eager_loop(merged, monkeypatch):
    """Teacher-forced on the same tokens, every step's logits agree and greedy decoding picks the
    same tokens; a second prompt reuses the cache and compiled step. The int4 kernel computes in
    bf16, so where one activation sits on a bf16 rounding tie the two paths may round it apart and
    a step moves by the kernel's own rounding (seen with Q8_0 embedding values: 0.46% of the largest
    logit, against up to 1.3% for either path against the fp32 dequantize reference); most steps agree
    bit for bit."""
    model, tok = merged
    monkeypatch.setenv("QALORA_COMPILE", "0")
    eager = PyTorchRuntime(model, tok, 512)
    assert not eager.static and "static" not in eager.name
    prefill, step = eager._eager()
    monkeypatch.setenv("QALORA_COMPILE", "1")
    fast = PyTorchRuntime(model, tok, 512)
    assert fast.static and fast.name.endswith("CUDA graphs" if fast.device.type == "cuda" else "compiled step")
    decoder = fast._decoder_for(len(PROMPT) + 24)
    forced = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = prefill(PROMPT), decoder.prefill(PROMPT)
    worst = (a - b).abs().max().item()
    for token in forced:
        a, b = step(token), decoder.step(token)
        worst = max(worst, (a - b).abs().max().item())
        assert a.argmax() == b.argmax()
    assert worst <= 1e-2 * a.abs().max().item()
    greedy = list(eager._tokens(PROMPT, 20, 0.0, 1.0, None))
    assert list(fast._tokens(PROMPT, 20, 0.0, 1.0, None)) == greedy
    assert list(fast._tokens(PROMPT[:3], 12, 0.0, 1.0, None)) == list(eager._tokens(PROMPT[:3], 12, 0.0, 1.0, None))
    assert fast._decoder is decoder  # no new cache, no new compile
    # a reply read from another thread: the model calls still run on the decoder's own thread
    seen = []
    worker = threading.Thread(target=lambda: seen.extend(fast._tokens(PROMPT, 20, 0.0, 1.0, None)))
    worker.start()
    worker.join()
    assert seen == greedy
    fast.close()


def test_a_prompt_longer_than_the_cache_is_refused(merged):
    model, _ = merged
    decoder = StaticDecoder(model, 16, compile=False)
    with pytest.raises(ValueError, match="a prompt of 16 tokens does not fit a cache of 16"):
        decoder.prefill(list(range(16)))
    decoder.close()
