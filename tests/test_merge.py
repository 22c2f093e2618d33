import copy

import torch

from helpers import GROUP, tiny_qalora, token_batch
from qalora.infer import QuantLinear
from qalora.layer import QALoRALinear
from qalora.merge import max_logit_diff, merge_adapters


def test_merged_logits_equal_adapter_logits_fp32():
    for bits in (2, 3, 4, 8):
        model, _ = tiny_qalora(bits=bits)
        merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
        batch = token_batch()
        diff = max_logit_diff(model, merged, [batch])
        assert diff <= 1e-4, (bits, diff)
        # The adapter really changes the output, so the check above is not vacuous.
        base, _ = tiny_qalora(bits=bits, randomize_b=False)
        assert max_logit_diff(base, merged, [batch]) > 1e-2


def test_merge_keeps_codes_and_moves_only_offsets():
    model, _ = tiny_qalora()
    before = {n: (m.packed.clone(), m.scale.clone(), m.offset.clone(), m.delta_offset().detach())
              for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    merged = merge_adapters(copy.deepcopy(model))
    after = {n: m for n, m in merged.named_modules() if isinstance(m, QuantLinear)}
    assert set(after) == set(before)
    assert not any(isinstance(m, QALoRALinear) for m in merged.modules())
    assert sum(p.numel() for n, p in merged.named_parameters() if "lora" in n) == 0
    for name, (packed, scale, offset, delta) in before.items():
        m = after[name]
        assert torch.equal(m.packed, packed) and torch.equal(m.scale, scale)
        assert torch.allclose(m.offset, offset + delta, atol=1e-7)
        assert m.group_size == GROUP


def test_merge_with_zero_adapter_is_identity():
    model, _ = tiny_qalora(randomize_b=False)
    merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
    assert max_logit_diff(model, merged, [token_batch()]) == 0.0
