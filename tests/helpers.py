"""Shared builders for tests: a tiny quantized QA-LoRA model with a non-zero adapter.

Everything is built on ``DEVICE`` (``QALORA_TEST_DEVICE``, default cpu), so the same tests run
on a GPU unchanged.
"""
import os
import socket

import torch

from qalora.config import AdapterConfig, QuantConfig
from qalora.models.model import inject_qalora, quantize_model
from qalora.models.tiny import tiny_random_llama

RANK = 4
GROUP = 32


def resolve_device(name: str) -> torch.device:
    """``cuda`` names the current GPU with its index (``cuda:0``): tensors report their device
    with the index, and ``torch.device("cuda") != torch.device("cuda:0")``."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


DEVICE = resolve_device(os.environ.get("QALORA_TEST_DEVICE", "cpu"))


def tiny_qalora(bits=4, group_size=GROUP, rank=RANK, dropout=0.0, seed=0, randomize_b=True, device=DEVICE,
                train_scales=False, scales_granularity="group"):
    model, tok = tiny_random_llama(seed)
    model.to(device)
    adapter = AdapterConfig(rank=rank, alpha=2 * rank, dropout=dropout, train_scales=train_scales,
                            scales_granularity=scales_granularity)
    inject_qalora(model, quantize_model(model, QuantConfig(bits, group_size), adapter.targets), adapter)
    if randomize_b:
        randomize_lora_b(model, seed + 1, 0.05)
    return model.eval(), tok


def randomize_lora_b(model, seed: int, std: float) -> None:
    """Give every adapter a non-zero ``lora_B`` (it starts at zero), so merging changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def trained_scales_qalora(bits=3, group_size=GROUP, steps=4, seed=0, granularity="group"):
    """A tiny QA-LoRA model with learned scales after a few real training steps (lr high enough that
    the scales move), in eval mode."""
    from qalora.config import TrainConfig
    from qalora.training.loop import train

    model, tok = tiny_qalora(bits=bits, group_size=group_size, seed=seed, randomize_b=False, train_scales=True,
                             scales_granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 250, (8, 24), generator=g).tolist()]
    train(model, data, data[:2], TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=steps,
                                             seed=seed), tok.pad_token_id, scales_lr=1e-3)
    return model.eval(), tok


def token_batch(n=2, t=24, vocab=250, seed=0, device=DEVICE):
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def default_qalora(rank=4, seed=0):
    """The embedded default model (SmolLM2-135M), 4-bit g32, with a small random adapter: a real
    model whose merged weights differ from the base. Returns ``(model, tokenizer)`` on the CPU."""
    from qalora.models.model import load_base

    model, tok = load_base("default")
    adapter = AdapterConfig(rank=rank)
    torch.manual_seed(seed)  # lora_A's initialization
    inject_qalora(model, quantize_model(model, QuantConfig(4, 32), adapter.targets), adapter)
    randomize_lora_b(model, seed + 1, 0.01)
    return model, tok


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smollm2_tokenizer():
    """The default model's tokenizer (SmolLM2's, read from the GGUF: slow): ChatML with a default system prompt."""
    from transformers import AutoTokenizer
    from qalora.models.model import default_gguf_path
    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def count_validations(monkeypatch) -> list[str]:
    """Each ``JobSpec.validate`` call from now on, by the spec's name (the real check still runs)."""
    from jobs.spec import JobSpec

    calls, real = [], JobSpec.validate

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(JobSpec, "validate", counting)
    return calls
