import copy

import pytest
import torch

from helpers import DEVICE, GROUP, tiny_qalora, token_batch
from qalora.method.quantlinear import QuantLinear
from qalora.method.layer import QALoRALinear
from qalora.method.merge import max_logit_diff, merge_adapters


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


def test_baseline_lora_needs_requantization_and_loses_exactness():
    from qalora.config import AdapterConfig, QuantConfig
    from qalora.method.layer import LoRALinear
    from qalora.models.model import merge_and_requantize
    from qalora.models.model import inject_qalora, quantize_model
    from qalora.models.tiny import tiny_random_llama

    model, _ = tiny_random_llama()
    model.to(DEVICE)
    adapter = AdapterConfig(rank=4, method="qlora-ptq")
    inject_qalora(model, quantize_model(model, QuantConfig(3, 32), adapter.targets), adapter)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14 and layers[0].lora_A.shape == (4, 64)  # full width, not in/group_size
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(std=0.05)
    merged = merge_and_requantize(copy.deepcopy(model), QuantConfig(3, 32), use_kernel=False)
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 14
    # The 16-bit merge is re-rounded to the 3-bit grid: the deployed model differs from the trained one.
    assert max_logit_diff(model, merged, [token_batch()]) > 1e-2


@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_a_learned_scale_run_merges_exactly_with_its_learned_scales(granularity):
    from helpers import trained_scales_qalora

    model, _ = trained_scales_qalora(bits=3, granularity=granularity)
    initial, _ = tiny_qalora(bits=3, randomize_b=False)
    start = {n: m.scale for n, m in initial.named_modules() if isinstance(m, QALoRALinear)}
    learned = {n: (m.packed.clone(), m.current_scale().detach().clone()) for n, m in model.named_modules()
               if isinstance(m, QALoRALinear)}
    moved = max((learned[n][1] - start[n]).abs().max().item() / start[n].abs().max().item() for n in start)
    assert moved > 1e-3  # the scales really trained
    merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
    batch = token_batch()
    assert max_logit_diff(model, merged, [batch]) <= 1e-5
    for name, m in merged.named_modules():
        if isinstance(m, QuantLinear):  # the codes as quantized; the scales as learned
            assert torch.equal(m.packed, learned[name][0]) and torch.equal(m.scale, learned[name][1])
    # and the merged model is not the one with the starting scales
    assert max_logit_diff(merge_adapters(initial, use_kernel=False), merged, [batch]) > 1e-3
