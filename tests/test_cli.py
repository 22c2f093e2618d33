import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"base", "bits", "group_size", "rank", "steps", "adapter_params", "train_loss_first",
               "train_loss_last", "eval_loss_quantized_base", "eval_loss_adapter", "eval_loss_merged",
               "merge_max_abs_logit_diff", "tokens_per_s", "peak_rss_mb", "wall_s"}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qalora", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = cli("train", "--base", "tiny-random", "--bits", "4", "--group-size", "32", "--data", "builtin:default",
              "--out", str(out), "--rank", "4", "--steps", "12", "--batch-size", "4", "--seq-len", "320",
              "--lr", "2e-3", "--warmup-steps", "2", "--eval-every", "6", "--save-every", "6")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_train_writes_report_and_models(trained):
    out, res = trained
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["steps"] == 12 and report["bits"] == 4 and report["group_size"] == 32
    assert report["eval_loss_adapter"] < report["eval_loss_quantized_base"] - 0.1
    assert report["merge_max_abs_logit_diff"] <= 1e-4
    # the merged model's eval runs on the path it is deployed on: the int4 kernel rounds scales and
    # zeros to bf16 (measured 5e-4 here); the exact dequantize path agrees to 1e-4
    tolerance = 5e-3 if report["eval_merged_path"] == "int4 kernel" else 1e-4
    assert abs(report["eval_loss_merged"] - report["eval_loss_adapter"]) < tolerance
    assert report["adapter_params"] > 0 and report["tokens_per_s"] > 0
    assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "eval_loss_merged" in res.stdout


def test_chat_prints_reply_and_the_runtime_that_answers(trained):
    out, _ = trained
    prompt = ("--prompt", "Make a contact card: Ana is 30 and lives in Rome.", "--max-new-tokens", "8")
    res = cli("chat", str(out / "merged"), *prompt)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()
    assert "answered by: llama.cpp (GGUF Q4_1) (CPU, with the run's GGUF export exports/model-q4_1.gguf" in res.stderr
    res_torch = cli("chat", str(out), *prompt, "--runtime", "pytorch")
    assert res_torch.returncode == 0, res_torch.stderr[-2000:]
    assert "answered by: PyTorch int4 kernel (merged model on the CPU)" in res_torch.stderr
    assert res_torch.stdout == res.stdout  # greedy: the same 8 tokens in both runtimes (measured)


@pytest.mark.parametrize("args, message", [
    (["--group-size", "48"], "group_size=48 does not divide in_features=64"),
    (["--bits", "5"], "bits=5 is not supported"),
    (["--base", "/no/such/dir"], "was not found"),
    (["--data", "/no/such/file.jsonl"], "no/such/file.jsonl"),
])
def test_bad_input_gives_message_and_exit_2(tmp_path, args, message):
    base = ["train", "--base", "tiny-random", "--out", str(tmp_path / "o"), "--steps", "1"]
    res = cli(*base, *args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_malformed_dataset_names_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    res = cli("train", "--base", "tiny-random", "--out", str(tmp_path / "o"), "--steps", "1", "--data", str(bad))
    assert res.returncode == 2
    assert "bad.jsonl" in res.stderr and "row 2" in res.stderr and "output" in res.stderr


def test_export_gguf_and_gptq(trained):
    out, _ = trained
    res = cli("export", str(out), "--format", "gguf")
    assert res.returncode == 0, res.stderr[-2000:]
    gguf_path = out / "exports" / "model-q4_1.gguf"
    assert gguf_path.is_file() and gguf_path.read_bytes()[:4] == b"GGUF"
    res = cli("export", str(out / "merged"), "--format", "gptq", "--out", str(out / "g"))
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    stored = json.loads((out / "g" / "export_report.json").read_text())
    assert result["max_abs_logit_diff"] == stored["max_abs_logit_diff"] > 0  # integer zeros cost something
    assert 0.0 <= result["top1_agreement"] <= 1.0 and "integer zero points" in res.stdout
    assert json.loads((out / "g" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_export_refuses_gguf_group_size_and_unknown_dir(tmp_path):
    res = cli("export", str(tmp_path), "--format", "gguf")
    assert res.returncode == 2 and "is not a finished run" in res.stderr


def test_eval_loss_and_multiple_choice(trained):
    out, _ = trained
    res = cli("eval", str(out), "--data", "builtin:contacts", "--limit", "8", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    loss = json.loads(res.stdout)
    assert loss["kind"] == "loss" and loss["examples"] == 8
    # what the CLI printed is the merged model's loss on those 8 held-out records, recomputed here
    # from full logits (the reference loss), and its perplexity is exp of it
    from qalora.data.builtin import heldout_records
    from qalora.data.records import collate, tokenize_records
    from qalora.evaluation.heldout import token_loss_sum
    from qalora.deployment.export.native import load_quantized
    model, tok = load_quantized(out / "merged", use_kernel=False)
    examples = tokenize_records(heldout_records(8), tok, 1024)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, 8, 4):
            b = collate(examples[i:i + 4], tok.pad_token_id)
            s, n = token_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"])
            total, count = total + s.item(), count + n
    assert loss["loss"] == pytest.approx(total / count, rel=1e-5)
    assert loss["perplexity"] == pytest.approx(math.exp(loss["loss"]), rel=1e-9)
    res = cli("eval", str(out), "--data", "builtin:contacts-mc", "--limit", "6", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    mc = json.loads(res.stdout)
    from qalora.evaluation.multiple_choice import BUILTIN_MC, eval_multiple_choice
    again = eval_multiple_choice(model, tok, BUILTIN_MC, limit=6, scoring="text")
    assert (mc["kind"], mc["n"], mc["correct"]) == ("multiple_choice", 6, again["correct"])
    assert mc["accuracy"] == again["correct"] / 6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_train_takes_the_bit_widths_preset_where_the_command_line_is_silent(bits, capsys):
    from qalora.cli import build_parser, with_preset
    from qalora.config import preset_for

    parse = lambda *a: build_parser().parse_args(["train", "--out", "x", "--bits", str(bits), *a])  # noqa: E731
    assert with_preset(parse()) == preset_for(bits)
    assert f"using the {bits}-bit preset for lr" in capsys.readouterr().err
    own = with_preset(parse("--lr", "1e-3", "--rank", "8", "--no-clip", "--train-scales", "--scales-lr", "1e-4"))
    assert own == {**preset_for(bits), "lr": 1e-3, "rank": 8, "alpha": 16.0, "clip": False, "train_scales": True,
                   "scales_lr": 1e-4}
    assert "preset" not in capsys.readouterr().err  # nothing was taken from it
    baseline = with_preset(parse("--method", "qlora-ptq"))
    assert baseline["train_scales"] is False  # the baseline re-quantizes: no scales to learn
