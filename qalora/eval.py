"""Held-out evaluation: token-weighted loss and perplexity."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions.

    Args:
        logits: ``(B, T, V)``; labels: ``(B, T)`` with ``-100`` where there is no loss.
    Returns:
        ``(sum of losses, number of supervised tokens)``.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


def batches(examples: list[dict], batch_size: int, pad_id: int, max_batches: int | None = None):
    from .data import collate
    count = 0
    for i in range(0, len(examples), batch_size):
        if max_batches is not None and count >= max_batches:
            return
        count += 1
        yield collate(examples[i:i + batch_size], pad_id)


@torch.no_grad()
def eval_loss(model, examples: list[dict], batch_size: int, pad_id: int, max_batches: int | None = None) -> float:
    """Mean per-token loss of ``model`` on ``examples`` (the first ``max_batches`` batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(examples, batch_size, pad_id, max_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, n = token_loss_sum(logits, batch["labels"])
        total, count = total + s.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
