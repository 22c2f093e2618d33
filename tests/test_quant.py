import pytest
import torch

from helpers import DEVICE
from qalora.errors import ConfigError
from qalora.config import valid_group_sizes
from qalora.method.quant import dequantize, pack_codes, quantize_rtn, quantize_tensor, unpack_codes

OUT, IN, GROUP = 24, 128, 32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (OUT, IN), generator=g, dtype=torch.uint8).to(DEVICE)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (OUT, IN * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, IN), codes)


def test_packed_size_scales_with_bits():
    w = torch.randn(OUT, IN, device=DEVICE)
    sizes = {b: quantize_tensor(w, b, GROUP).packed.numel() for b in (2, 3, 4, 8)}
    assert sizes[8] == 4 * sizes[2] == 2 * sizes[4]
    assert sizes[3] * 8 == 3 * OUT * IN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_half_step(bits):
    torch.manual_seed(0)
    w = torch.randn(OUT, IN, device=DEVICE)
    codes, scale, offset = quantize_rtn(w, bits, GROUP)
    assert int(codes.max()) <= 2 ** bits - 1
    err = (dequantize(codes, scale, offset) - w).abs().reshape(OUT, IN // GROUP, GROUP)
    # Round-to-nearest on a min-max grid: every weight is within half a step of its value.
    bound = scale[..., None] / 2 + 1e-6
    assert (err <= bound).all()
    # And the grid's end points are hit exactly (min -> code 0).
    assert torch.allclose(offset, w.reshape(OUT, IN // GROUP, GROUP).amin(-1))


def test_error_falls_with_bits():
    torch.manual_seed(1)
    w = torch.randn(OUT, IN, device=DEVICE)
    errs = [(quantize_tensor(w, b, GROUP).dequantize() - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] / 1000


def test_constant_group_is_exact():
    w = torch.full((2, 32), 0.25, device=DEVICE)
    assert torch.equal(quantize_tensor(w, 4, 32).dequantize(), w)


def test_bad_group_size_names_layer_and_choices():
    with pytest.raises(ConfigError) as e:
        quantize_rtn(torch.randn(8, 96, device=DEVICE), 4, 64, layer="model.layers.0.mlp.up_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj" in msg and "in_features=96" in msg and "[16, 32]" in msg
    assert valid_group_sizes(96) == [16, 32]


def test_bad_bits():
    with pytest.raises(ConfigError, match="bits=5"):
        quantize_rtn(torch.randn(8, 64, device=DEVICE), 5, 32)


def _group_errors(w, codes, scale, offset, importance=None):
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance
    err = (dequantize(codes, scale, offset) - w).square() * imp
    return err.reshape(w.shape[0], -1, GROUP).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_increases_any_group_error_over_min_max(bits):
    g = torch.Generator().manual_seed(bits)
    # heavy tails (a t-distribution): the outliers min-max spends its range on
    w = (torch.randn(OUT, IN, generator=g) / torch.rand(OUT, IN, generator=g).clamp_min(0.05).sqrt()).to(DEVICE)
    importance = torch.rand(IN, generator=g).to(DEVICE) + 0.1  # e.g. a layer's mean squared input
    for imp in (None, importance):
        plain = _group_errors(w, *quantize_rtn(w, bits, GROUP), imp)
        clipped = _group_errors(w, *quantize_rtn(w, bits, GROUP, clip=True, importance=imp), imp)
        assert (clipped <= plain * (1 + 1e-5) + 1e-9).all()  # per group, never worse (float rounding aside)
        assert clipped.sum() < (0.8 if bits == 2 else 0.95) * plain.sum()  # and better overall at low bits


def test_clip_search_codes_stay_in_range_and_constant_groups_stay_exact():
    w = torch.randn(OUT, IN, device=DEVICE)
    w[:, :GROUP] = 0.25  # a constant group: min-max holds it exactly, the search must too
    codes, scale, offset = quantize_rtn(w, 2, GROUP, clip=True)
    assert int(codes.max()) <= 3 and (scale > 0).all()
    assert torch.equal(dequantize(codes, scale, offset)[:, :GROUP], w[:, :GROUP])


def test_q8_0_round_trip_keeps_q8_0_values_and_rounds_others_within_half_a_step():
    from qalora.method.quant import dequantize_q8_0, quantize_q8_0, round_q8_0

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g).to(DEVICE)
    codes, d = quantize_q8_0(w)
    assert codes.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (16, 2)
    once = dequantize_q8_0(codes, d)
    step = d.float().repeat_interleave(32, dim=1)
    assert ((once - w).abs() <= step / 2 + 1e-7).all()
    # values that are Q8_0 already (a GGUF base's embedding) come back bit for bit
    assert torch.equal(round_q8_0(once), once)
    codes2, d2 = quantize_q8_0(once)
    assert torch.equal(codes2, codes) and torch.equal(d2, d)
