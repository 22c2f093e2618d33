"""Held-out evaluation: token-weighted loss and perplexity."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions, from full logits: the reference
    :func:`qalora.method.loss.causal_lm_loss` (which never makes them) is tested against.

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
    from qalora.data.records import collate
    count = 0
    for i in range(0, len(examples), batch_size):
        if max_batches is not None and count >= max_batches:
            return
        count += 1
        yield collate(examples[i:i + batch_size], pad_id)


def count_batches(n_examples: int, batch_size: int, max_batches: int | None = None) -> int:
    n = -(-n_examples // batch_size)
    return n if max_batches is None else min(n, max_batches)


@torch.no_grad()
def eval_loss(model, examples: list[dict], batch_size: int, pad_id: int, max_batches: int | None = None,
              on_progress=None) -> float:
    """Mean per-token loss of ``model`` on ``examples`` (the first ``max_batches`` batches).

    The loss goes through the head a chunk of supervised positions at a time
    (:func:`qalora.method.loss.causal_lm_loss`), so no batch's full-vocabulary logits exist.
    ``on_progress(done, total)`` is called after each batch.
    """
    from qalora.method.loss import causal_lm_loss, loss_rows

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    n_batches = count_batches(len(examples), batch_size, max_batches)
    for i, batch in enumerate(batches(examples, batch_size, pad_id, max_batches), 1):
        rows = loss_rows(batch["labels"])
        total += causal_lm_loss(model, batch["input_ids"].to(device), batch["labels"].to(device), rows.to(device))
        count += rows.numel()
        if on_progress:
            on_progress(i, n_batches)
    model.train(was_training)
    return total.item() / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


HELDOUT_BUILTINS = ("builtin:contacts", "builtin:default")


def evaluate_dir(model_dir, data: str, k_shot: int = 0, limit: int | None = None, scoring: str | None = None,
                 seq_len: int = 1024, batch_size: int = 4, device: str = "cpu", use_kernel: bool = False,
                 on_progress=None) -> dict:
    """Evaluate a saved low-bit model (a job's 'merged' folder) on ``data``.

    Multiple-choice data (see ``qalora.evaluation.multiple_choice``) gives accuracy by log-likelihood, scored by
    ``scoring`` (default: 'text' for ``builtin:contacts-mc``, else 'letter'). Any other dataset
    gives the mean per-token loss on its replies and the perplexity; the built-in training set is
    replaced by held-out prompts of the same kind, so its loss is held-out too. ``limit`` caps the
    number of questions or records. ``use_kernel=False`` evaluates the exact dequantized weights.
    ``on_progress(done, total)`` counts questions (or batches) scored.
    """
    from qalora.evaluation import multiple_choice as mc_eval
    from qalora.data.builtin import heldout_records
    from qalora.data.records import load_records, tokenize_records
    from qalora.deployment.export.native import load_quantized
    from qalora.method.quantlinear import dequantize_once_if_it_fits

    model, tokenizer = load_quantized(model_dir, device=device, use_kernel=use_kernel)
    dequantize_once_if_it_fits(model)
    result = {"model_dir": str(model_dir), "data": str(data)}
    if mc_eval.looks_multiple_choice(data):
        scoring = scoring or ("text" if str(data) == mc_eval.BUILTIN_MC else "letter")
        mc = mc_eval.eval_multiple_choice(model, tokenizer, data, k_shot=k_shot, limit=limit, scoring=scoring,
                                          on_progress=on_progress)
        mc["perplexity"] = perplexity(mc["loss"])
        return {**result, "kind": "multiple_choice", **mc}
    if str(data).strip() in HELDOUT_BUILTINS:
        records = heldout_records(limit or 100)
    else:
        records = load_records(data)[:limit] if limit else load_records(data)
    examples = tokenize_records(records, tokenizer, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = eval_loss(model, examples, batch_size, pad_id, on_progress=on_progress)
    return {**result, "kind": "loss", "loss": loss, "perplexity": perplexity(loss), "examples": len(examples)}


GENERATION_REPLIES = 8  # held-out replies generated per job: a few, so a model that cannot answer shows it


def reply_pairs(records: list[dict]) -> list[tuple[list[dict], str]]:
    """(conversation up to the last reply, that reply) for each chat record ending in a reply."""
    pairs = []
    for r in records:
        messages = r.get("messages") or []
        if len(messages) >= 2 and messages[-1]["role"] == "assistant" and messages[-1]["content"].strip():
            pairs.append((messages[:-1], messages[-1]["content"].strip()))
    return pairs


def heldout_replies(data: str, n: int, eval_fraction: float, seed: int, columns: dict | None = None,
                    max_samples: int | None = None) -> list[tuple[list[dict], str]]:
    """``n`` conversations the training never saw, with their expected replies: for the built-in set
    fresh prompts of the same kind, else the run's own held-out split (same records, fraction and seed)."""
    from qalora.data.builtin import heldout_records
    from qalora.data.records import load_records, split_records

    if str(data).strip() in HELDOUT_BUILTINS:
        return reply_pairs(heldout_records(n))
    records = load_records(data, columns=columns, max_samples=max_samples, seed=seed)
    _, held = split_records(records, eval_fraction, seed)
    return reply_pairs(held)[:n]


def exact_replies(model, tokenizer, pairs: list[tuple[list[dict], str]], on_progress=None,
                  max_new_tokens: int = 256) -> dict | None:
    """Greedy replies to held-out conversations, compared with the expected reply exactly (leading
    and trailing whitespace aside): ``{"n", "exact", "accuracy", "examples"}``, the first three
    (prompt, expected, got) kept to show; ``None`` when there is nothing to ask (plain-text data)."""
    from qalora.deployment.generate import chat

    if not pairs:
        return None
    exact, examples = 0, []
    for i, (messages, expected) in enumerate(pairs, 1):
        expected = expected.strip()
        budget = min(len(tokenizer(expected)["input_ids"]) + 16, max_new_tokens)
        got = chat(model, tokenizer, messages, max_new_tokens=budget, temperature=0.0).strip()
        exact += got == expected
        if len(examples) < 3:
            examples.append({"prompt": messages[-1]["content"], "expected": expected, "got": got})
        if on_progress:
            on_progress(i, len(pairs))
    return {"n": len(pairs), "exact": exact, "accuracy": exact / len(pairs), "examples": examples}


def generation_check_dir(model_dir, data: str, *, n: int = GENERATION_REPLIES, eval_fraction: float = 0.1,
                         seed: int = 0, device: str = "cpu", use_kernel: bool = True, on_progress=None,
                         columns: dict | None = None, max_samples: int | None = None) -> dict | None:
    """:func:`exact_replies` of a saved low-bit model (a job's 'merged' folder) on ``data``'s held-out
    conversations (:func:`heldout_replies`)."""
    from qalora.deployment.export.native import load_quantized

    pairs = heldout_replies(data, n, eval_fraction, seed, columns, max_samples)
    if not pairs:
        return None
    model, tokenizer = load_quantized(model_dir, device=device, use_kernel=use_kernel)
    result = exact_replies(model, tokenizer, pairs, on_progress=on_progress)
    return {"data": str(data), **result}
