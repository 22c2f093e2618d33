"""What each export format can hold: the one place its constraints live.

Every caller (the export itself, the runtime choosing llama.cpp, the form, the job spec, the
publish dialog) asks these functions; none repeats a rule.
"""
from __future__ import annotations

from qalora.errors import ConfigError

FORMATS = ("native", "gguf", "torchao", "torchao-int4", "gptq", "peft")
GGUF_QK = 32  # weights per Q4_1 block (ggml's QK4_1)


def gguf_fits(bits: int, group_size: int) -> bool:
    """Whether GGUF blocks hold this model exactly: a Q4_1 block of 32 weights must lie inside one
    group (8-bit goes to F16, any group size)."""
    return bits > 4 or group_size % GGUF_QK == 0


def gguf_type(bits: int) -> str:
    """The GGUF tensor type our quantized weights take: ``q4_1`` (2-4 bits: the codes fit its nibbles,
    so 2 and 3 bits cost what 4 do: llama.cpp has no exact lower-bit block with a float offset), or
    ``f16`` (8 bits: no block type holds them)."""
    return "f16" if bits == 8 else "q4_1"


def gguf_widens(bits: int) -> bool:
    """Whether a GGUF file stores these codes in wider blocks than their bits (2 and 3 bits in Q4_1)."""
    return gguf_type(bits) == "q4_1" and bits < 4


def int4_layout_fits(bits: int, group_size: int, dtype: str = "bfloat16") -> bool:
    """Whether torchao's int4 (tinygemm) layout holds it: 4-bit codes, the kernel's group sizes, bf16."""
    from qalora.method.kernels import KERNEL_GROUP_SIZES  # imports torch: not for the web process's checks

    return bits == 4 and group_size in KERNEL_GROUP_SIZES and dtype == "bfloat16"


def check_format(fmt: str, bits: int, group_size: int) -> None:
    """Refuse a format that cannot hold this model, before any work is done."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}.")
    if fmt == "gguf" and not gguf_fits(bits, group_size):
        raise ConfigError(
            f"GGUF export needs a group size that is a multiple of {GGUF_QK}, got {group_size}: llama.cpp's "
            f"Q4_1 format keeps one scale and one offset per block of {GGUF_QK} weights, so a block would span "
            f"groups with different scales and the weights would have to be re-quantized, changing the "
            f"model. Fine-tune with group_size 32, 64 or 128, or export this model in the native format.")
    if fmt == "torchao-int4" and not int4_layout_fits(bits, group_size):
        raise ConfigError(int4_refusal(bits, group_size))


def int4_refusal(bits: int, group_size: int) -> str:
    from qalora.method.kernels import KERNEL_GROUP_SIZES

    return (f"the torchao int4 (tinygemm) export holds 4-bit codes in groups of "
            f"{', '.join(map(str, KERNEL_GROUP_SIZES))} with bf16 scales; this run is {bits}-bit, group "
            f"{group_size}. Export it as 'torchao' (int-x, any bits) or 'gguf' instead.")
