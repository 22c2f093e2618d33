"""The prepared GPU check: everything the CPU cannot prove, in one run of at most 8 minutes.

On one CUDA GPU it runs, each step in its own process with its own time limit:

1. the test suite on CUDA (``QALORA_TEST_DEVICE=cuda``; the library tiers always, the app and
   jobs tiers where their packages are installed);
2. train -> merge -> verify -> chat of the default model in bf16, with RTN and with GPTQ
   (``python -m qalora train``, then a greedy reply from the saved low-bit model);
3. decode speed of the merged model (PyTorch's int4 kernel where the GPU has it, the
   dequantize fallback, and the bf16 base) and the training step time;

and prints one table. ``--dry-run`` runs the same plumbing on the CPU with the tiny random
model, two steps and the device-tracing tests only: it proves the script, not the GPU.

    python bench/gpu_check.py [--dry-run] [--base default] [--budget-s 480]

Where the embedded default model cannot travel (the device machine takes 64 MiB of files), the
check writes a random-weight model of SmolLM2-135M's shape and says so in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_TESTS = ["tests/test_device.py", "tests/test_quant.py", "tests/test_layer.py", "tests/test_merge.py",
                 "tests/test_infer.py", "tests/test_train.py", "tests/test_loader.py", "tests/test_model.py",
                 "tests/test_pipeline.py", "tests/test_gptq.py", "tests/test_native.py", "tests/test_tokenizers.py"]
APP_PACKAGES = ("sqlalchemy", "alembic", "gradio", "gguf")
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
PROMPT = "Make a contact card: Ana Ruiz, 41, lives in Porto."


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.perf_counter() - t0


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def environment(device: str) -> dict:
    import torch

    from qalora import kernels
    row = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        row["gpu"] = torch.cuda.get_device_name(0)
        row["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        row["int4 kernel"] = kernels.int4_kernel_supported(torch.device("cuda"), 4, 32, 576, 576)
    return row


def random_smollm2(directory: Path) -> str:
    """SmolLM2-135M's shape with random bf16 weights and the ChatML byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qalora.tiny import byte_tokenizer
    tok = byte_tokenizer()
    shape = {**SMOLLM2_SHAPE, "vocab_size": max(len(tok), 256)}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         bos_token_id=None)).to(torch.bfloat16)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def suite(device: str, dry: bool, timeout: float, extra: list[str] = ()) -> dict:
    files = ["tests/test_device.py"] if dry else list(LIBRARY_TESTS)
    if not dry and all(_importable(p) for p in APP_PACKAGES):
        files = ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not slow", *extra, *files]
    rc, out, secs = _run(cmd, timeout, {"QALORA_TEST_DEVICE": device})
    tail = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    return {"ok": rc == 0, "seconds": secs, "result": tail[-1].strip("= ") if tail else f"exit {rc}",
            "scope": "whole suite" if files == ["tests"] else f"{len(files)} library test files",
            "log": out}


def finetune_and_chat(base: str, method: str, device: str, dry: bool, out: Path, timeout: float) -> dict:
    steps, dtype = ("2", "float32") if dry else ("30", "bfloat16")
    cmd = [sys.executable, "-m", "qalora", "train", "--base", base, "--bits", "4", "--group-size", "32",
           "--quant-method", method, "--steps", steps, "--batch-size", "4", "--seq-len", "256",
           "--eval-every", steps, "--save-every", steps, "--dtype", dtype, "--out", str(out)]
    rc, log, secs = _run(cmd, timeout, {"QALORA_DEVICE": device})
    report_path = out / "report.json"
    if rc or not report_path.is_file():
        return {"ok": False, "seconds": secs, "result": f"train exit {rc}", "log": log}
    report = json.loads(report_path.read_text())
    report.setdefault("peak_gpu_mb", None)
    rc, reply, chat_s = _run([sys.executable, "-m", "qalora", "chat", str(out / "merged"), "--prompt", PROMPT,
                              "--max-new-tokens", "32"], timeout / 3, {"QALORA_DEVICE": device})
    ok = rc == 0 and report["merge_max_abs_logit_diff"] <= 1e-3  # the check computes in fp32 on every device
    return {"ok": ok, "seconds": secs + chat_s,
            "result": (f"merge max|dlogit| {report['merge_max_abs_logit_diff']:.2g}, eval loss base "
                       f"{report['eval_loss_quantized_base']:.3f} -> merged {report['eval_loss_merged']:.3f}, "
                       f"{report['tokens_per_s']:.0f} tok/s, peak GPU {report.get('peak_gpu_mb') or 0:.0f} MB"),
            "reply": reply.strip().splitlines()[-1][:80] if reply.strip() else "", "log": log + "\n--- chat ---\n" + reply}


def speed(merged: Path, device: str, dry: bool) -> dict:
    """Greedy decode tokens/s of the merged model: int4 kernel, dequantize fallback."""
    import torch

    from qalora.export.native import load_quantized
    from qalora.infer import QuantLinear
    new = 8 if dry else 128
    result = {}
    for label, use_kernel in (("int4 kernel", True), ("dequantize", False)):
        model, tok = load_quantized(merged, device=device, use_kernel=use_kernel, dtype=torch.bfloat16)
        qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        active = f"{sum(m.kernel_active(torch.device(device)) for m in qlayers)}/{len(qlayers)} layers on the kernel"
        ids = torch.tensor([tok(PROMPT)["input_ids"]], device=device)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            model.generate(ids, **{**kw, "max_new_tokens": 16, "min_new_tokens": 16})  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
        result[label] = {"tok_s": new / (time.perf_counter() - t0), "kernel_active": active}
        del model
    return result


def _keep(directory: Path | None, name: str, text: str) -> None:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def layer_speed(device: str, dry: bool) -> str:
    """One merged layer's forward, int4 kernel against dequantize-and-matmul, at decode (1 token)
    and prefill (512 tokens) widths, for LLaMA-7B's attention and MLP shapes: microseconds each."""
    import torch

    from qalora.infer import QuantLinear
    from qalora.quant import quantize_tensor
    shapes = [(256, 256)] if dry else [(4096, 4096), (11008, 4096), (4096, 11008)]
    reps = 3 if dry else 50
    cells = []
    for out_f, in_f in shapes:
        qt = quantize_tensor(torch.randn(out_f, in_f, device=device), 4, 128 if in_f % 128 == 0 else 32)
        layers = {"kernel": QuantLinear(qt, use_kernel=True), "dequant": QuantLinear(qt, use_kernel=False)}
        for m in (1, 512):
            x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
            times = {}
            for label, layer in layers.items():
                with torch.inference_mode():
                    for _ in range(3):
                        layer(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        layer(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                times[label] = (time.perf_counter() - t0) / reps * 1e6
            active = layers["kernel"].kernel_active(torch.device(device))
            cells.append(f"{out_f}x{in_f} m={m}: kernel {times['kernel']:.0f}"
                         f"{'' if active else ' (inactive)'} / dequant {times['dequant']:.0f} us")
    return "; ".join(cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model: check the script itself")
    p.add_argument("--base", default=None, help="default: 'default' where installed, else a random SmolLM2 shape")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-n 4 --dist loadfile'")
    p.add_argument("--log-dir", type=Path, default=None, help="write each step's whole output here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --dry-run to check the script on the CPU")
        return 2
    start = time.perf_counter()
    left = lambda: max(30.0, args.budget_s - (time.perf_counter() - start))  # noqa: E731
    rows: list[tuple[str, bool, float, str]] = []
    env = environment(device)
    rows.append(("environment", True, 0.0, ", ".join(f"{k} {v}" for k, v in env.items())))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base or ("tiny-random" if dry else None)
        if base is None:
            from qalora.errors import ModelError
            from qalora.model import default_gguf_path
            try:
                default_gguf_path()
                base = "default"
            except ModelError:
                base = random_smollm2(tmp / "random-smollm2")
                rows.append(("base", True, 0.0, "default model not installed here: random SmolLM2-135M shape"))
        s = suite(device, dry, min(left() * 0.45, 240), args.pytest_args.split())
        _keep(args.log_dir, "suite.log", s["log"])
        rows.append((f"test suite on {device} ({s['scope']})", s["ok"], s["seconds"], s["result"]))
        merged = None
        for method in ("rtn", "gptq"):
            r = finetune_and_chat(base, method, device, dry, tmp / method, min(left() / 2, 150))
            rows.append((f"train->merge->verify->chat, {method}", r["ok"], r["seconds"],
                         r["result"] + (f'; reply "{r["reply"]}"' if r.get("reply") else "")))
            _keep(args.log_dir, f"{method}.log", r["log"])
            if not r["ok"]:
                print(r["log"][-4000:], file=sys.stderr)
            elif merged is None:
                merged = tmp / method / "merged"
        if merged is not None:
            t0 = time.perf_counter()
            try:
                sp = speed(merged, device, dry)
                rows.append(("decode (merged, bf16 activations)", True, time.perf_counter() - t0,
                             ", ".join(f"{k} {v['tok_s']:.1f} tok/s ({v['kernel_active']})"
                                       for k, v in sp.items())))
            except Exception as exc:  # the table still prints; the traceback goes to stderr and the log
                import traceback
                _keep(args.log_dir, "decode.log", traceback.format_exc())
                traceback.print_exc()
                rows.append(("decode (merged, bf16 activations)", False, time.perf_counter() - t0,
                             f"{type(exc).__name__}: {exc}"[:300]))
        t0 = time.perf_counter()
        try:
            rows.append(("one layer, int4 kernel vs dequantize", True, time.perf_counter() - t0,
                         layer_speed(device, dry)))
        except Exception as exc:
            import traceback
            traceback.print_exc()
            rows.append(("one layer, int4 kernel vs dequantize", False, time.perf_counter() - t0,
                         f"{type(exc).__name__}: {exc}"[:300]))
    if not s["ok"]:
        print(s["log"][-4000:], file=sys.stderr)
    total = time.perf_counter() - start
    print(f"\nGPU check ({'dry run on CPU' if dry else 'CUDA'}), {total:.0f} s in all\n")
    print("| step | ok | seconds | result |")
    print("|---|---|---|---|")
    for name, ok, secs, result in rows:
        print(f"| {name} | {'yes' if ok else '**NO**'} | {secs:.0f} | {result} |")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("step", "ok", "seconds", "result"), r)) for r in rows], indent=2))
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
