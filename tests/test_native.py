import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, tiny_qalora, token_batch
from qalora.errors import ModelError
from qalora.deployment.export.native import load_quantized, save_quantized
from qalora.method.merge import max_logit_diff, merge_adapters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = tiny_qalora(bits=3)
    merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
    out = save_quantized(merged, tok, tmp_path_factory.mktemp("m") / "merged")
    return merged, out


def test_checkpoint_layout_and_config(saved):
    merged, out = saved
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qalora" and qc["bits"] == 3 and qc["group_size"] == 32
    assert len(qc["modules"]) == 14  # 7 projections x 2 layers
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.packed")
    assert packed.dtype == torch.uint8 and packed.shape == (128, 64 * 3 // 8)
    assert not any("lora" in k for k in keys)
    assert "model.layers.0.mlp.up_proj.weight" not in keys
    assert (out / "tokenizer.json").is_file()


def test_reload_in_process_is_identical(saved):
    merged, out = saved
    loaded, tok = load_quantized(out, device=DEVICE, use_kernel=False)
    assert max_logit_diff(merged, loaded, [token_batch()]) == 0.0
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("<|im_start|>")


def test_reload_in_fresh_process(saved):
    merged, out = saved
    batch = token_batch(n=1, t=10)
    expected = merged(**batch).logits[0, -1].tolist()
    code = ("import sys, json, torch; from qalora.deployment.export.native import load_quantized;"
            f"m, _ = load_quantized({str(out)!r}, device={str(DEVICE)!r}, use_kernel=False);"
            f"ids = torch.tensor([{batch['input_ids'][0].tolist()}], device={str(DEVICE)!r});"
            "print(json.dumps(m(input_ids=ids).logits[0, -1].tolist()))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert max(abs(a - b) for a, b in zip(got, expected)) == 0.0


def test_loading_a_non_qalora_dir_says_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="not a QA-LoRA low-bit checkpoint"):
        load_quantized(tmp_path)
