"""Measuring a model: held-out loss, multiple-choice accuracy, lm-evaluation-harness benchmarks.
"""
