"""LLaMA-family bases: found (a path, a GGUF file, a Hub id), streamed, quantized and wrapped with QA-LoRA.
"""
