"""GPTQ export: zero-point fit, checkpoint layout, and loading in gptqmodel and transformers."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_qalora
from qalora.errors import ConfigError, ModelError
from qalora.deployment.export.gptq import (REPORT, check_ids, export_gptq, fit_zero_points, logit_gap, logits_of,
                                           round_zero_points, with_offsets)
from qalora.deployment.export.native import load_quantized, save_quantized
from qalora.method.gptq import from_gptq_tensors, load_gptq_checkpoint, to_gptq_tensors
from qalora.method.merge import merge_adapters
from qalora.method.quant import unpack_codes

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # skip a 25 s C++ build; same layout

SEED = 0
GROUP = 32
OUT, IN = 64, 128
# gptqmodel's TorchLinear runs only in float16/bfloat16. Our logits are at most ~6 in magnitude
# here; float16 rounds every activation, embedding and norm weight to 2^-11 relative (~3e-3 on a
# logit of 6) and the errors of a few roundings through two layers add up: measured <= 0.022.
FP16_TOL = 0.05
# The same modules cast to float32 with the checkpoint's float32 tensors restored differ from our
# dequantization only by float32 summation order.
FP32_TOL = 1e-4


def _group_error(codes, scale, offset, new_scale, zero):
    q = codes.float().reshape(OUT, -1, GROUP)
    w = scale[..., None] * q + offset[..., None]
    return ((new_scale[..., None] * (q - zero[..., None]) - w) ** 2).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_point_fit_is_never_worse_than_rounding(bits):
    g = torch.Generator().manual_seed(SEED + bits)
    maxq = 2 ** bits - 1
    codes = torch.randint(0, maxq + 1, (OUT, IN), generator=g).to(torch.uint8)
    scale = torch.rand(OUT, IN // GROUP, generator=g) + 0.01
    # Merged offsets: off the integer grid, some pushed beyond the representable range.
    offset = -scale * (torch.rand(scale.shape, generator=g) * (maxq + 4) - 2)
    fit = fit_zero_points(codes, scale, offset, bits)
    rounded = round_zero_points(scale, offset, bits)
    err_fit, err_round = _group_error(codes, scale, offset, *fit), _group_error(codes, scale, offset, *rounded)
    assert (err_fit <= err_round * (1 + 1e-5) + 1e-9).all()
    assert err_fit.sum() < 0.8 * err_round.sum()  # measured 0.35-0.6 of the rounding error
    for _, zero in (fit, rounded):
        assert torch.equal(zero, zero.round()) and zero.min() >= 1 and zero.max() <= maxq
    # Offsets already on the grid (zero in [1, maxq]) are kept exactly.
    zero = torch.randint(1, maxq + 1, scale.shape, generator=g).float()
    new_scale, new_zero = fit_zero_points(codes, scale, -scale * zero, bits)
    assert torch.allclose(new_scale, scale, rtol=1e-6) and torch.equal(new_zero, zero)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zeros_decode_field_by_field(bits):
    """Zeros >= 1 mean no borrow: a reader adding 1 to each packed field gets the same zeros."""
    g = torch.Generator().manual_seed(SEED)
    codes = torch.randint(0, 2 ** bits, (OUT, IN), generator=g).to(torch.uint8)
    scale = torch.rand(OUT, IN // GROUP, generator=g) + 0.01
    offset = -scale * (torch.rand(scale.shape, generator=g) * 2 ** bits)
    # Constant groups as min-max RTN stores them (scale clamped to 1e-8): all zeros, all 0.3.
    codes[:2, :GROUP] = 0
    scale[:2, 0], offset[0, 0], offset[1, 0] = 1e-8, 0.0, 0.3
    new_scale, zero = fit_zero_points(codes, scale, offset, bits)
    parts = to_gptq_tensors(codes, new_scale, -new_scale * zero, bits, GROUP)
    weight = parts["scales"].float().T * (0 - zero)  # the weight of code 0 in each group
    assert abs(weight[0, 0]) <= 2 ** -24 * 2 ** bits and weight[1, 0] == pytest.approx(0.3, rel=2 ** -11)
    words = parts["qzeros"].to(torch.int64) & 0xFFFFFFFF
    per_word = 32 // bits
    fields = torch.stack([(words >> (bits * j)) & (2 ** bits - 1) for j in range(per_word)], -1)
    naive = (fields.reshape(words.shape[0], -1) + 1).T  # [out, groups]
    _, s, o = from_gptq_tensors(**parts, bits=bits, group_size=GROUP)
    assert torch.equal(naive.float(), torch.round(-o / s))


def _as_exported(exact, native, out):
    """``exact`` with the groups read back from the GPTQ files by the independent importer."""
    read = load_gptq_checkpoint(out)
    source = load_file(native / "model.safetensors")
    bits = exact.model.layers[0].mlp.up_proj.bits
    for name, (codes, _, _) in read.items():
        assert torch.equal(codes, unpack_codes(source[f"{name}.packed"], bits, codes.shape[1]))
    model = with_offsets(exact, {name: (scale, offset) for name, (_, scale, offset) in read.items()})
    # and every other tensor as the file holds it (fp16 embedding, norms)
    own, written = model.state_dict(), load_file(out / "model.safetensors")
    with torch.no_grad():
        for key, value in written.items():
            if key in own and own[key].is_floating_point():
                own[key].copy_(value.float())
    return model


@pytest.fixture
def no_compile():
    """gptqmodel wraps every TorchLinear in torch.compile; compiling costs seconds per shape."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """bits -> (native dir, GPTQ dir, report), from a tiny model with a non-zero adapter."""
    made = {}
    for bits in (2, 3, 4, 8):
        root = tmp_path_factory.mktemp(f"gptq{bits}")
        model, tok = tiny_qalora(bits=bits)
        native = save_quantized(merge_adapters(copy.deepcopy(model), use_kernel=False), tok, root / "merged")
        made[bits] = (native, root / "gptq", export_gptq(native, root / "gptq"))
    return made


def test_checkpoint_layout_and_report(exports, tmp_path):
    native, out, report = exports[4]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((out / "quantize_config.json").read_text())
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", 4, GROUP)
    assert (quant["desc_act"], quant["sym"], quant["checkpoint_format"]) == (False, False, "gptq")
    tensors, source = load_file(out / "model.safetensors"), load_file(native / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.qweight"].shape == (128 * 4 // 32, 64)
    assert tensors[f"{name}.scales"].dtype == torch.float16
    assert not any(k.endswith((".packed", ".offset")) for k in tensors)
    # the embedding: the native file's Q8_0 values in fp16 (never widened to fp32), as GPTQ files hold it
    from qalora.deployment.export.native import float_state
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(tensors["model.embed_tokens.weight"], float_state(source)["model.embed_tokens.weight"].half())
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / REPORT).read_text()) == report
    # The report is reproduced from the written file by an independent reader.
    exact, tok = load_quantized(native, use_kernel=False)
    ids = check_ids(tok)
    again = logit_gap(logits_of(exact, ids), logits_of(_as_exported(exact, native, out), ids))
    assert again["max_abs_logit_diff"] == pytest.approx(report["max_abs_logit_diff"], abs=1e-6)
    assert report["check_tokens"] == again["check_tokens"] > 200
    tried = report["alternatives"]
    assert set(tried) == {"fit", "round"}
    assert report["zero_points"] == "fit"  # on this model: mean 0.19 against 0.28 for rounding
    assert tried["fit"]["mean_abs_logit_diff"] == report["mean_abs_logit_diff"] < \
        tried["round"]["mean_abs_logit_diff"]
    rounded = export_gptq(native, tmp_path / "rounded", zero_points="round")
    assert rounded["alternatives"] == {"round": tried["round"]}
    codes, scale, offset = load_gptq_checkpoint(tmp_path / "rounded")[name]
    zero = round_zero_points(source[f"{name}.scale"], source[f"{name}.offset"], 4)[1]
    torch.testing.assert_close(offset, -scale * zero, rtol=0, atol=0)
    torch.testing.assert_close(scale, source[f"{name}.scale"], rtol=2 ** -11, atol=0)  # float16
    with pytest.raises(ConfigError, match="zero_points"):
        export_gptq(native, tmp_path / "x", zero_points="nearest")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptqmodel_loads_export_with_the_reported_gap(exports, bits, no_compile):
    from gptqmodel import BACKEND, GPTQModel

    native, out, report = exports[bits]
    exact, tok = load_quantized(native, use_kernel=False)
    ids = check_ids(tok)
    reference, ours = logits_of(exact, ids), logits_of(_as_exported(exact, native, out), ids)
    theirs = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    fp16 = logits_of(theirs, ids)
    assert logit_gap(ours, fp16)["max_abs_logit_diff"] < FP16_TOL
    assert abs(logit_gap(reference, fp16)["max_abs_logit_diff"] - report["max_abs_logit_diff"]) < FP16_TOL
    # Same modules in float32, with the float tensors float16 loading rounded put back.
    theirs.float()
    plain = {k: v for k, v in load_file(out / "model.safetensors").items()
             if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    theirs.load_state_dict(plain, strict=False)
    fp32 = logits_of(theirs, ids)
    assert logit_gap(ours, fp32)["max_abs_logit_diff"] < FP32_TOL
    fp32 = logit_gap(reference, fp32)
    assert fp32["max_abs_logit_diff"] == pytest.approx(report["max_abs_logit_diff"], abs=FP32_TOL)
    assert fp32["mean_abs_logit_diff"] == pytest.approx(report["mean_abs_logit_diff"], abs=FP32_TOL)


def test_transformers_loads_export(exports, no_compile):
    from transformers import AutoModelForCausalLM

    native, out, report = exports[3]
    exact, tok = load_quantized(native, use_kernel=False)
    ids = check_ids(tok)
    ours = logits_of(_as_exported(exact, native, out), ids)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    assert logit_gap(ours, logits_of(theirs, ids))["max_abs_logit_diff"] < FP16_TOL


def test_export_refuses_folders_it_cannot_convert(exports, tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        export_gptq(tmp_path, tmp_path / "out")
    native = exports[2][0]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((native / name).read_bytes())
    with pytest.raises(ModelError, match="tokenizer"):
        export_gptq(bare, tmp_path / "out")
