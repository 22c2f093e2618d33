"""GPTQ: pack/unpack layout, calibration quality against RTN, and parity with gptqmodel's output."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from qalora.errors import ConfigError
from qalora.method.gptq import from_gptq_tensors, gptq_quantize, load_gptq_checkpoint, to_gptq_tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
# Without this gptqmodel JIT-builds a C++ packer on first use (~25 s, needs a compiler); its
# Python packer writes the same layout.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

SEED = 0
GROUP = 32
OUT, IN = 64, 128
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_CALIB, CALIB_LEN = 6, 48


def _tiny_llama():
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # All-positive rows give groups with zero point 0: the case where GPTQ v1's "zero - 1"
        # borrows from the neighbouring field of the packed word.
        model.model.layers[0].mlp.up_proj.weight[:16].abs_().add_(0.05)
    return model


def _calibration():
    g = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(0, 256, (CALIB_LEN,), generator=g) for _ in range(N_CALIB)]


def _dequant(codes, scale, offset):
    gs = codes.shape[1] // scale.shape[1]
    return scale.repeat_interleave(gs, 1) * codes.float() + offset.repeat_interleave(gs, 1)


def _random_groupwise(bits):
    g = torch.Generator().manual_seed(SEED + bits)
    maxq = 2 ** bits - 1
    codes = torch.randint(0, maxq + 1, (OUT, IN), generator=g).to(torch.uint8)
    scale = torch.rand(OUT, IN // GROUP, generator=g) + 0.01
    zero = torch.randint(0, maxq + 1, scale.shape, generator=g).float()
    zero[:, 0], zero[:, 1] = 0, maxq  # the extremes of the zero-point range
    offset = -scale * (zero + 0.3 * torch.randn(scale.shape, generator=g))  # off the integer grid
    offset[0, 2] = scale[0, 2] * 3  # positive offset: zero < 0 must clamp to 0
    return codes, scale, offset


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits, fmt):
    codes, scale, offset = _random_groupwise(bits)
    packed = to_gptq_tensors(codes, scale, offset, bits, GROUP, checkpoint_format=fmt)
    assert packed["qweight"].shape == (IN * bits // 32, OUT) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (IN // GROUP, OUT * bits // 32)
    assert torch.equal(packed["g_idx"], torch.arange(IN, dtype=torch.int32) // GROUP)
    codes2, scale2, offset2 = from_gptq_tensors(**packed, bits=bits, group_size=GROUP,
                                                checkpoint_format=fmt)
    assert torch.equal(codes2, codes) and torch.equal(scale2, scale)
    zero = torch.round(-offset / scale).clamp(0, 2 ** bits - 1)
    assert torch.equal(offset2, -scale * zero)


def test_packed_layout_matches_gptq_bit_order():
    codes = torch.zeros(OUT, IN, dtype=torch.uint8)
    codes[0, :8] = torch.arange(8, dtype=torch.uint8)
    scale, offset = torch.ones(OUT, IN // GROUP), torch.zeros(OUT, IN // GROUP)
    packed = to_gptq_tensors(codes, scale, offset, 4, GROUP)
    assert packed["qweight"][0, 0].item() == 0x76543210  # input i at bits 4*i of word i // 8
    # v1 stores zero - 1 by subtracting 0x11111111 from the word: zero 0 borrows all the way up.
    assert packed["qzeros"][0, 0].item() == 0xEEEEEEEF - 2 ** 32
    codes3 = torch.zeros(OUT, IN, dtype=torch.uint8)
    codes3[0, 10] = 7  # the 3-bit value that straddles words 0 and 1 (bits 30, 31 | 0)
    qweight3 = to_gptq_tensors(codes3, scale, offset, 3, GROUP)["qweight"]
    assert qweight3[0, 0].item() == -(2 ** 31) + 2 ** 30 and qweight3[1, 0].item() == 1


def test_act_order_g_idx_is_rejected():
    codes, scale, offset = _random_groupwise(4)
    packed = to_gptq_tensors(codes, scale, offset, 4, GROUP)
    packed["g_idx"] = packed["g_idx"][torch.randperm(IN, generator=torch.Generator().manual_seed(SEED))]
    with pytest.raises(ConfigError, match="desc_act=False"):
        from_gptq_tensors(**packed, bits=4, group_size=GROUP)


def test_load_checkpoint_from_config_json(tmp_path):
    codes, scale, offset = _random_groupwise(4)
    packed = to_gptq_tensors(codes, scale, offset, 4, GROUP, checkpoint_format="gptq_v2")
    save_file({f"model.layers.0.mlp.up_proj.{k}": v for k, v in packed.items()},
              str(tmp_path / "model.safetensors"))
    quant = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
             "sym": False, "checkpoint_format": "gptq_v2"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    loaded = load_gptq_checkpoint(tmp_path)
    assert list(loaded) == ["model.layers.0.mlp.up_proj"]
    expected = from_gptq_tensors(**packed, bits=4, group_size=GROUP, checkpoint_format="gptq_v2")
    assert all(torch.equal(a, b) for a, b in zip(loaded["model.layers.0.mlp.up_proj"], expected))


def test_gptq_quantize_rejects_bad_settings():
    model = _tiny_llama()
    with pytest.raises(ConfigError, match="calibration"):
        gptq_quantize(model, [], 4, GROUP, TARGETS)
    with pytest.raises(ConfigError, match="does not divide"):
        gptq_quantize(model, _calibration(), 4, 48, TARGETS)


def _rtn_minmax(weight, bits):
    w = weight.reshape(weight.shape[0], -1, GROUP)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (hi - lo) / (2 ** bits - 1)
    return (torch.round((w - lo) / scale) * scale + lo).reshape_as(weight)


def _layer_inputs(model, calib) -> dict[str, list[torch.Tensor]]:
    """Each target's inputs on the calibration samples, ``(tokens, in)`` per sample."""
    acts = {}
    hooks = [m.register_forward_hook(lambda _, inp, out, n=n: acts.setdefault(n, []).append(
        inp[0].reshape(-1, inp[0].shape[-1]))) for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in TARGETS]
    with torch.no_grad():
        for ids in calib:
            model(ids[None])
    for hook in hooks:
        hook.remove()
    return acts


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_calibration_activations(bits):
    model, calib = _tiny_llama(), _calibration()
    acts = _layer_inputs(model, calib)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress = []
    result = gptq_quantize(model, calib, bits, GROUP, TARGETS,
                           on_progress=lambda i, n: progress.append((i, n)))

    assert sorted(result) == sorted(acts)  # every target, 7 per layer
    assert progress == [(i + 1, 14) for i in range(14)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    total_gptq = total_rtn = 0.0
    for name, (codes, scale, offset) in result.items():
        weight = model.get_submodule(name).weight.detach()
        assert codes.dtype == torch.uint8 and codes.shape == weight.shape
        assert int(codes.max()) <= 2 ** bits - 1
        assert scale.shape == offset.shape == (weight.shape[0], weight.shape[1] // GROUP)
        x = torch.cat(acts[name])
        err_gptq = torch.linalg.norm(x @ (weight - _dequant(codes, scale, offset)).T)
        err_rtn = torch.linalg.norm(x @ (weight - _rtn_minmax(weight, bits)).T)
        assert err_gptq < err_rtn, name
        total_gptq, total_rtn = total_gptq + err_gptq ** 2, total_rtn + err_rtn ** 2
    # Measured 0.92 at 3 and 4 bits on this random model; real models gain more.
    assert (total_gptq / total_rtn) ** 0.5 < 0.97


def _save_tiny_base(path):
    from tokenizers import Tokenizer, models

    _tiny_llama().save_pretrained(path)
    # gptqmodel insists on loading a tokenizer next to the model.
    vocab = {f"t{i}": i for i in range(256)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0",
                                         pad_token="t1", eos_token="t2").save_pretrained(path)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptqmodel_checkpoint_imports_exactly(tmp_path, bits):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    _save_tiny_base(tmp_path / "base")
    # gptqmodel's default act_group_aware reorders columns only within and between whole groups,
    # so its g_idx stays contiguous and the checkpoint is importable.
    qcfg = QuantizeConfig(bits=bits, group_size=GROUP, desc_act=False, sym=False)
    qmodel = GPTQModel.load(str(tmp_path / "base"), qcfg, device="cpu", dtype=torch.float32)
    qmodel.quantize([{"input_ids": ids.tolist(), "attention_mask": [1] * CALIB_LEN}
                     for ids in _calibration()])
    qmodel.save(str(tmp_path / "gptq"))

    ours = load_gptq_checkpoint(tmp_path / "gptq")
    theirs = GPTQModel.load(str(tmp_path / "gptq"), device="cpu", backend=BACKEND.TORCH,
                            dtype=torch.float16).model
    assert len(ours) == 14
    assert any((offset == 0).any() for _, _, offset in ours.values())  # v1 borrow case present
    for name, (codes, scale, offset) in ours.items():
        reference = theirs.get_submodule(name).dequantize_weight().T.float()  # fp16 math
        # gptqmodel rounds scale * (q - zero) to float16 once (<= 2^-11 relative); we compute in
        # float32 from the same fp16 scales. A zero point off by one would be a full scale step.
        torch.testing.assert_close(_dequant(codes, scale, offset), reference, rtol=2 ** -10, atol=0)


def test_bf16_model_is_calibrated_in_fp32_and_left_as_it_was():
    """What the pipeline hands GPTQ on a GPU: a bf16 model. Each layer is calibrated in fp32 (the
    dtype gptqmodel's Hessians and our exact code recovery need) and given back in bf16."""
    fp32 = _tiny_llama()
    bf16 = _tiny_llama().to(torch.bfloat16)
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # the same weights
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    got = gptq_quantize(bf16, _calibration(), 4, GROUP, TARGETS)
    ref = gptq_quantize(fp32, _calibration(), 4, GROUP, TARGETS)
    assert all(v.dtype == torch.bfloat16 and torch.equal(before[k], v) for k, v in bf16.state_dict().items())
    for name, (codes, scale, offset) in got.items():
        assert scale.dtype == offset.dtype == torch.float32 and codes.dtype == torch.uint8
        # Layer 0's q/k/v see identical inputs (bf16 embeddings are exact in fp32); everything
        # after the attention differs only through the bf16-rounded rotary tables.
        same = (codes == ref[name][0]).float().mean().item()
        first = ".layers.0.self_attn." in name and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
        assert same == 1.0 if first else same > 0.98, (name, same)


def test_gptq_with_its_clip_search_lowers_the_layer_output_error_at_two_bits():
    """``QuantConfig(clip=True)`` with GPTQ: gptqmodel's own grid over each group's range."""
    from qalora.method.gptq import GPTQ_CLIP_NORM, gptq_config

    assert gptq_config(2, GROUP, clip=True).mse == GPTQ_CLIP_NORM and gptq_config(2, GROUP).mse == 0.0
    model, calib = _tiny_llama(), _calibration()
    acts = _layer_inputs(model, calib)
    errors = {}
    for clip in (False, True):
        result = gptq_quantize(model, calib, 2, GROUP, TARGETS, clip=clip)
        errors[clip] = sum(torch.linalg.norm(torch.cat(acts[n]) @ (model.get_submodule(n).weight.detach()
                                                                   - _dequant(*result[n])).T) ** 2 for n in result)
    assert errors[True] < errors[False]
