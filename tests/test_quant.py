import pytest
import torch

from helpers import DEVICE
from qalora.errors import ConfigError
from qalora.quant import (dequantize, pack_codes, quantize_rtn, quantize_tensor, unpack_codes,
                          valid_group_sizes)

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
