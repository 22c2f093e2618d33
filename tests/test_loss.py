"""The chunked vocabulary loss against the full-logits reference (``qalora.evaluation.heldout.token_loss_sum``)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, tiny_qalora
from qalora.data.records import collate
from qalora.evaluation.heldout import eval_loss, token_loss_sum
from qalora.method.loss import causal_lm_loss, chunk_rows, linear_cross_entropy, loss_rows

N, H, V = 301, 48, 997  # 301 rows: no chunk size below divides it


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_elements", [V, 64 * V, 10_000 * V])  # 1 row, 64 rows, all rows at once
@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_loss(chunk_elements, weight_grad):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(DEVICE).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[::5] = -100
    full = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    full.backward()
    ref_h = hidden.grad.clone()
    ref_w = weight.grad.clone() if weight_grad else None
    hidden.grad, weight.grad = None, None

    chunked = linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk_elements)
    (chunked * 3.0).backward()  # the backward scales by the incoming gradient
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - full.item()) <= 1e-5 * abs(full.item())
    assert _rel(hidden.grad / 3.0, ref_h) <= 1e-5
    if weight_grad:
        assert _rel(weight.grad / 3.0, ref_w) <= 1e-5
    else:
        assert weight.grad is None
    assert chunk_rows(V, chunk_elements) == chunk_elements // V


def test_no_grad_path_equals_the_autograd_path():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, H, generator=g).to(DEVICE), torch.randn(V, H, generator=g).to(DEVICE)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[::3] = -100
    with torch.no_grad():
        a = linear_cross_entropy(hidden, weight, labels, chunk_elements=7 * V)
    b = linear_cross_entropy(hidden.requires_grad_(True), weight, labels, chunk_elements=7 * V)
    assert torch.equal(a, b.detach())


def _padded_batch(tok):
    """Three conversations of different lengths, right-padded: prompts and padding carry no loss."""
    examples = []
    for n, reply in ((9, 5), (14, 7), (5, 3)):
        ids = [(7 * i + n) % 200 + 3 for i in range(n + reply)]
        examples.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    return collate(examples, tok.pad_token_id)


def test_model_loss_without_a_mask_equals_the_masked_full_logits_loss_and_gradients():
    """Right padding needs no attention mask: the loss and every adapter gradient are those of the
    reference forward with the mask and full logits, to fp32 rounding."""
    model, tok = tiny_qalora(dropout=0.0)
    model.train()
    batch = _padded_batch(tok)
    ids, labels, mask = (batch[k].to(DEVICE) for k in ("input_ids", "labels", "attention_mask"))
    ref, n = token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    rows = loss_rows(batch["labels"])
    assert rows.numel() == n == 5 + 7 + 3  # the replies' tokens; prompts and padding go nowhere near the head
    got = causal_lm_loss(model, ids, labels, rows.to(DEVICE))
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, ref_grads[k]) <= 1e-4, k
    # every position through the head (no rows): the ignored ones add nothing
    with torch.no_grad():
        assert abs(causal_lm_loss(model, ids, labels).item() - ref.item()) <= 1e-5 * ref.item()


def test_eval_loss_is_the_mean_over_supervised_tokens_of_the_reference():
    model, tok = tiny_qalora()
    examples = []
    for n in (4, 9, 13, 6, 11):
        ids = [(5 * i + n) % 200 + 3 for i in range(n + 6)]
        examples.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 2):
            b = {k: v.to(DEVICE) for k, v in collate(examples[i:i + 2], tok.pad_token_id).items()}
            s, n = token_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"])
            total, count = total + s.item(), count + n
    assert eval_loss(model, examples, 2, tok.pad_token_id) == pytest.approx(total / count, rel=1e-5)
