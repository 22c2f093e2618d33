"""The method: group-wise quantization, the QA-LoRA layer, its exact merge, and the low-bit kernels.

Tensors in, tensors out: nothing here reads a file or knows a model's family.
"""
