"""Training: the loop, data parallelism, and the fine-tune recipe that runs the whole method.
"""
