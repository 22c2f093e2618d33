"""The model shapes the benchmarks run, built in place: no download, no file to carry.

- ``default``: the embedded SmolLM2-135M (its GGUF, read once and cached here as bf16 safetensors);
- ``smollm2-135m``: the same shape with random weights (where the default model is not installed);
- ``tinyllama-1.1b``: TinyLlama-1.1B's shape with random weights;
- ``tiny``: the tests' 2-layer model (``qalora.models.tiny``), for dry runs of the benches' plumbing.

Random weights are ``N(0, 0.02)`` like a fresh LLaMA: speeds and memory are those of the real shape,
the replies are noise.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "cache" / "smollm2-135m-bf16"
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
SHAPES["tiny"] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True)
CHOICES = ("default", *SHAPES)


def default_installed() -> bool:
    from qalora.errors import ModelError
    from qalora.models.model import default_gguf_path
    try:
        default_gguf_path()
        return True
    except ModelError:
        return False


def resolve(shape: str) -> str:
    """``default`` where the embedded model is installed, else its random-weight twin."""
    return "smollm2-135m" if shape == "default" and not default_installed() else shape


def build(shape: str, dtype, device="cpu", seed: int = 0):
    """``(model, vocab_size)``: the shape's causal LM in ``dtype`` on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = resolve(shape)
    if shape == "default":
        if not (CACHE / "config.json").is_file():
            from qalora.models.model import load_base
            model, tok = load_base("default", dtype=torch.bfloat16)
            model.save_pretrained(CACHE)
            tok.save_pretrained(CACHE)
        model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=dtype)
        return model.to(device).eval(), model.config.vocab_size
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, initializer_range=0.02,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval(), config.vocab_size
