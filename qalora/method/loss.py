"""Next-token loss over the vocabulary in chunks: no full-vocabulary logits, no gradient of them.

A causal LM's loss is ``cross_entropy(h @ W^T, y)`` over every supervised position, with ``W`` the
``(vocab, hidden)`` output head. Materialised whole, the logits and their gradient are
``tokens x vocab`` floats each (1,024 tokens of a 49,152-token vocabulary: 200 MB apiece in fp32,
several copies alive at once), more than the rest of a small model's activations. Here the
positions go through the head a chunk at a time (as Liger's fused linear cross-entropy does):
each chunk's logits are made, turned into its loss and into the gradient of its hidden states
(``(softmax - onehot) @ W``), and dropped. The backward only scales the gradient kept from the
forward. The sum is exact to fp32 rounding: the logits are computed in the hidden states' dtype
(what the head computes in the model), then every softmax is in fp32.

Only the positions that carry a loss go through the head at all: :func:`loss_rows` picks them on
the host, from the labels the batch was built with, so no device value is read back.
"""
from __future__ import annotations

import contextlib

import torch

IGNORE = -100
CHUNK_ELEMENTS = 2 ** 22  # fp32 logits per chunk (16 MB): what one chunk holds


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // vocab)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, want_grad: bool):
    """Loss sum of one chunk and, if asked, ``d loss / d logits`` (fp32, ``(rows, vocab)``)."""
    logits = (h @ weight.t()).float()
    lse = logits.logsumexp(-1)
    valid = labels != IGNORE
    target = labels.clamp_min(0)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    if not want_grad:
        return loss, None
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, target[:, None], -valid[:, None].float())
    grad.mul_(valid[:, None])
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            loss, grad = _chunk_loss(h, weight, labels[start:start + rows], need_h or need_w)
            total += loss
            if need_h:
                grad_h[start:start + rows] = grad.to(hidden.dtype) @ weight
            if need_w:
                grad_w += grad.t() @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Summed ``cross_entropy(hidden @ weight^T, labels)``, ignoring ``-100``, a chunk at a time.

    Args:
        hidden: ``(N, H)``; weight: ``(V, H)``; labels: ``(N,)`` long.
    Returns:
        a 0-dim fp32 tensor, differentiable in ``hidden`` (and ``weight`` if it requires grad).
    """
    rows = chunk_rows(weight.shape[0], chunk_elements)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, rows)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        total += _chunk_loss(hidden[start:start + rows], weight, labels[start:start + rows], False)[0]
    return total


def loss_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the shifted positions ``(B, T-1)`` that carry a loss: computed on the host
    (``labels`` is the CPU batch) so the device never reports a count back."""
    return (labels[:, 1:] != IGNORE).reshape(-1).nonzero().squeeze(1)


RIGHT_PADDED_SDPA = "qalora_right_padded_sdpa"


def _right_padded_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, given no mask: its causal kernel (see :func:`causal_lm_loss`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


@contextlib.contextmanager
def _mask_free(model):
    """Inside the block a model on SDPA attention builds no mask at all.

    With no mask given, transformers still inspects the positions for packed sequences, reading a
    device value back (``(...).all()``) on every forward; an attention implementation of its own,
    registered without a mask function, skips mask preparation entirely. Models on another
    attention (eager, flash) keep theirs.
    """
    from transformers import AttentionInterface

    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    AttentionInterface.register(RIGHT_PADDED_SDPA, _right_padded_sdpa)
    config._attn_implementation = RIGHT_PADDED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token loss of a LLaMA-family ``model`` on a right-padded batch.

    ``rows`` (from :func:`loss_rows`, on the model's device) limits the head to the supervised
    positions; without it every position goes through and ``-100`` labels count nothing. No
    attention mask is needed for right padding: causal attention never lets a real token see the
    padding after it, and padding positions carry no loss (their gradient is exactly zero), so
    the model runs SDPA's causal kernel with no mask to build or to check.
    """
    decoder = getattr(model, model.base_model_prefix)
    with _mask_free(model):
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    if rows is not None:
        hidden, target = hidden.index_select(0, rows), target.index_select(0, rows)
    return linear_cross_entropy(hidden, model.get_output_embeddings().weight, target)
