import pytest
import torch

from qalora.method import kernels
from qalora.method.quantlinear import QuantLinear
from qalora.deployment.generate import _generation_kwargs, chat, stream_chat
from qalora.method.quant import quantize_tensor

OUT, IN = 64, 256


def quant_linear(bits, group_size, use_kernel=True, device="cpu"):
    torch.manual_seed(bits * 7 + group_size)
    w = (torch.randn(OUT, IN) * 0.05).to(device)  # quantized where it lives, as the pipeline does
    return QuantLinear(quantize_tensor(w, bits, group_size), use_kernel=use_kernel)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_reference_cpu(bits, group_size):
    layer = quant_linear(bits, group_size)
    assert layer.kernel_active(torch.device("cpu"))
    x = torch.randn(5, IN)
    got = layer(x)
    # The kernel takes bf16 input, bf16 scales and zeros and returns bf16: the reference is the
    # same math in fp32, so the only difference left is the bf16 rounding of the output (2^-8).
    ref = x.to(torch.bfloat16).float() @ layer.kernel_weight().t()
    assert (got - ref).abs().max().item() <= 2 ** -8 * ref.abs().max().item()
    assert got.shape == (5, OUT) and got.dtype == torch.float32
    # Against the exact fp32 layer the kernel is off only by bf16 rounding of input and params.
    exact = layer.reference_forward(x)
    assert (got - exact).abs().max().item() <= 2e-2 * exact.abs().max().item()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("pad_to", [(128, 16), (64, 48), (256, 32)])
def test_padded_kernel_equals_dequantize_and_matmul(bits, pad_to):
    """Widths the kernel's tiles do not fit are padded, not sent to the fallback: padded weights
    have scale and zero 0 and padded inputs are 0, so the padded call computes the same (on CUDA
    the tiles force it; here the CPU kernel is made to pad)."""
    torch.manual_seed(bits)
    out_f, in_f = 200, 96  # neither a multiple of 128 nor of 48
    layer = QuantLinear(quantize_tensor(torch.randn(out_f, in_f) * 0.05, bits, 32))
    k_pad, n_pad, _ = kernels.kernel_layout("cpu", 32, in_f, out_f, pad_to)
    assert (k_pad, n_pad) == ((in_f + pad_to[0] - 1) // pad_to[0] * pad_to[0], (out_f + pad_to[1] - 1) // pad_to[1] * pad_to[1])
    assert layer.prepare_kernel(pad_to=pad_to)
    w, sz = layer._kernel_weights(torch.device("cpu"))
    assert sz.shape == (k_pad // 32, n_pad, 2)
    x = torch.randn(3, 7, in_f)
    got = layer(x)
    ref = x.to(torch.bfloat16).float() @ layer.kernel_weight().t()
    assert got.shape == (3, 7, out_f)
    assert (got - ref).abs().max().item() <= 2 ** -8 * ref.abs().max().item()
    assert kernels.kernel_layout("cpu", 32, in_f, out_f) == (96, 208, 1)  # the CPU kernel's own: 16 rows
    layer.prepare_kernel()
    assert torch.equal(layer(x), got)  # more padding, the same outputs to the last bit


def test_cuda_layout_pads_to_whole_tiles_and_groups():
    # SmolLM2's 576-wide layers fit with 4 inner k-tiles, no padding; odd widths are padded
    assert kernels.kernel_layout("cuda", 32, 576, 576) == (576, 576, 4)
    assert kernels.kernel_layout("cuda", 64, 1536, 192) == (1536, 192, 8)
    assert kernels.kernel_layout("cuda", 32, 2048, 196) == (2048, 200, 8)
    assert kernels.kernel_layout("cuda", 128, 96, 64) == (128, 64, 8)
    assert kernels.kernel_layout("cuda", 32, 4000, 64) == (4000, 64, 2)  # 4000 = 125 x 32


def test_8bit_and_odd_group_use_reference():
    assert not quant_linear(8, 32).kernel_active(torch.device("cpu"))
    assert not quant_linear(4, 16).kernel_active(torch.device("cpu"))
    layer = quant_linear(8, 32)
    x = torch.randn(3, IN)
    assert torch.allclose(layer(x), x @ layer.quantized().dequantize().t(), atol=1e-5)


def test_kernel_zero_mapping_is_exact_on_integer_inputs():
    # With one-hot inputs the kernel returns a single weight: scale*(q-8)+zero == scale*q+offset.
    layer = quant_linear(4, 32)
    x = torch.zeros(IN, IN)
    x[torch.arange(IN), torch.arange(IN)] = 1.0
    got = torch.cat([layer(rows) for rows in x.split(kernels.kernel_max_rows(x.device))]).t()
    w = layer.quantized().dequantize()
    assert (got - w).abs().max() <= 2 ** -7 * w.abs().max()  # bf16 rounding of scale and zero


def test_many_rows_take_the_dequantize_path_few_take_the_kernel():
    """Prefill-sized calls (more rows than KERNEL_MAX_ROWS) run dequantize-and-matmul, which beats
    the int4 kernel there; decode-sized calls run the kernel."""
    layer = quant_linear(4, 32)
    limit = kernels.kernel_max_rows(torch.device("cpu"))
    many = torch.randn(2, limit // 2 + 1, IN)  # limit + 2 rows in a (batch, tokens, in) activation
    assert torch.equal(layer(many), layer.reference_forward(many))
    few = many[:, :limit // 2]  # exactly limit rows
    kernel_out = few.to(torch.bfloat16).float() @ layer.kernel_weight().t()
    assert (layer(few) - kernel_out).abs().max() <= 2 ** -8 * kernel_out.abs().max()
    assert not torch.equal(layer(few), layer.reference_forward(few))


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_equals_reference_cuda(bits):
    layer = quant_linear(bits, 128, device="cuda")
    assert layer.packed.is_cuda
    assert layer.kernel_active(torch.device("cuda")) == (torch.cuda.get_device_capability() >= (8, 0))
    x = torch.randn(4, IN, device="cuda")
    ref = layer.reference_forward(x.to(torch.bfloat16).float())
    assert (layer(x) - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_streaming_chat_grows_and_matches_non_streaming():
    from qalora.models.tiny import tiny_random_llama
    model, tok = tiny_random_llama()
    msgs = [{"role": "user", "content": "hello"}]
    pieces = list(stream_chat(model, tok, msgs, max_new_tokens=12))
    assert len(pieces) >= 2
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert pieces[-1] == chat(model, tok, msgs, max_new_tokens=12)
    assert kernels.KERNEL_GROUP_SIZES == (32, 64, 128, 256)


def test_generation_stops_on_the_tokenizer_eos_and_every_config_eos():
    from types import SimpleNamespace
    from qalora.models.tiny import llama3_tokenizer
    tok = llama3_tokenizer()  # eos <|eot_id|>, no pad token
    eot, end = tok.eos_token_id, tok.convert_tokens_to_ids("<|end_of_text|>")
    model = lambda eos: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))  # noqa: E731
    assert _generation_kwargs(tok, 8, 0.0, 0.9)["eos_token_id"] == [eot]
    assert _generation_kwargs(tok, 8, 0.0, 0.9, model=model(end))["eos_token_id"] == [eot, end]
    assert _generation_kwargs(tok, 8, 0.0, 0.9, model=model([end, eot]))["eos_token_id"] == [eot, end]
    assert _generation_kwargs(tok, 8, 0.0, 0.9, model=model(None))["eos_token_id"] == [eot]
    assert _generation_kwargs(tok, 8, 0.0, 0.9)["pad_token_id"] == eot
    tok.pad_token = tok.convert_ids_to_tokens(0)  # a pad id of 0 is kept, not mistaken for "none"
    assert _generation_kwargs(tok, 8, 0.7, 0.9)["pad_token_id"] == 0


@pytest.mark.parametrize("capability,expected", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_int4_kernel_only_from_compute_capability_8(monkeypatch, request, capability, expected):
    from qalora.method import kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    kernels._capability.cache_clear()  # asked once per GPU: forget the last parameter's answer
    request.addfinalizer(kernels._capability.cache_clear)  # and leave no made-up answer behind
    cuda = torch.device("cuda")
    assert kernels.int4_kernel_supported(cuda, 4, 32, 256, 64) is expected
    assert kernels.int4_kernel_supported(cuda, 4, 32, 576, 200) is expected  # any width: padded
    assert kernels.int4_kernel_supported(cuda, 8, 32, 256, 64) is False  # 8-bit never uses it


def test_keeping_the_dequantized_weights_computes_the_same_logits(tmp_path):
    """Benchmarks on a CPU dequantize each weight once (keep_dequantized) instead of per call: the
    same values, so the same logits, bit for bit."""
    from qalora.deployment.export.native import load_quantized, save_quantized
    from qalora.method.quantlinear import QuantLinear, keep_dequantized
    from qalora.method.merge import merge_adapters
    from tests.helpers import tiny_qalora

    model, tok = tiny_qalora(seed=4)
    save_quantized(merge_adapters(model), tok, tmp_path / "merged")
    merged, _ = load_quantized(tmp_path / "merged", use_kernel=False)
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        per_call = merged(ids).logits
        keep_dequantized(merged)
        kept = merged(ids).logits
        again = merged(ids).logits
    layers = [m for m in merged.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m._dense is not None for m in layers)  # dequantized once, kept
    assert torch.equal(per_call, kept) and torch.equal(kept, again)
