"""QA-LoRA: quantization-aware low-rank adaptation with an exact merge into low-bit weights."""
__version__ = "0.1.0"
