"""The torchao export loads with stock transformers (no qalora code) and computes our merged model.

Measured on the tiny random model (logits of magnitude ~3): an fp32 export differs from the merged
model by 2.6e-6 to 3.3e-6 (fp32 rounding of ``-offset / scale``); the default bf16 export by
0.05-0.11, the same as our own merged model run in bf16 (0.06-0.10): the bf16 rounding of
activations, scales and zero points, not a change of weights.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch

from helpers import tiny_qalora, token_batch
from qalora.export import export_run
from qalora.export.native import load_quantized, save_quantized
from qalora.export.torchao import export_torchao
from qalora.merge import merge_adapters


@pytest.fixture(scope="module", params=[3, 4])
def merged(request, tmp_path_factory):
    model, tok = tiny_qalora(bits=request.param, device="cpu")
    merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
    return merged, save_quantized(merged, tok, tmp_path_factory.mktemp("run") / "merged")


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def test_fp32_export_loads_in_a_process_without_qalora_and_is_exact(merged, tmp_path):
    model, merged_dir = merged
    out = export_torchao(merged_dir, tmp_path / "torchao", dtype="float32")
    batch = token_batch(n=1, t=12, device="cpu")
    code = ("import json, sys, torch; from transformers import AutoModelForCausalLM;"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r});"
            "w = m.model.layers[0].mlp.down_proj.weight;"
            f"ids = torch.tensor([{batch['input_ids'][0].tolist()}]);"
            "print(json.dumps({'type': type(w).__name__, 'dtype': str(m.dtype), 'qalora': 'qalora' in sys.modules,"
            " 'logits': m(input_ids=ids).logits[0].tolist()}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["type"] == "IntxUnpackedToInt8Tensor" and got["dtype"] == "torch.float32" and not got["qalora"]
    diff = (torch.tensor(got["logits"]) - _logits(model, batch)[0]).abs().max().item()
    assert diff <= 1e-5, diff


def test_bf16_export_is_within_bf16_inference_of_the_merged_model(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    model, merged_dir = merged
    result = export_run(merged_dir, "torchao", out=tmp_path / "torchao")
    assert result["format"] == "torchao" and result["dtype"] == "bfloat16"
    config = json.loads((tmp_path / "torchao" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["quant_method"] == "torchao"
    assert "qalora" not in json.dumps(config["quantization_config"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "torchao")
    ours_bf16, _ = load_quantized(merged_dir, use_kernel=False, dtype=torch.bfloat16)
    batch = token_batch(device="cpu")
    exact = _logits(model, batch)
    diff = (_logits(loaded, batch) - exact).abs().max().item()
    ours = (_logits(ours_bf16, batch) - exact).abs().max().item()
    # ours dequantizes in fp32 and rounds each weight to bf16 once; the format stores its scale and
    # zero point in bf16 and rounds again in its dequantize: measured 0.115 against 0.069 (3-bit)
    assert 0 < diff <= 2.0 * ours, (diff, ours)
    assert (_logits(loaded, batch).argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_sharded_export_loads_the_same_model(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    _, merged_dir = merged
    whole = export_torchao(merged_dir, tmp_path / "whole")
    sharded = export_torchao(merged_dir, tmp_path / "sharded", shard_bytes=30_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((sharded / f).is_file() for f in files)
    assert not (sharded / "model.safetensors").exists()
    batch = token_batch(device="cpu")
    a, b = (_logits(AutoModelForCausalLM.from_pretrained(p), batch) for p in (whole, sharded))
    assert torch.equal(a, b)


def test_tokenizer_and_chat_template_travel(merged, tmp_path):
    from transformers import AutoTokenizer

    _, merged_dir = merged
    out = export_torchao(merged_dir, tmp_path / "t")
    messages = [{"role": "user", "content": "hi"}]
    ours, theirs = AutoTokenizer.from_pretrained(merged_dir), AutoTokenizer.from_pretrained(out)
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages, tokenize=False)
